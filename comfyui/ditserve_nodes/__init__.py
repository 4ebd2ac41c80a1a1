"""ditserve's ComfyUI custom nodes: our DiT inside unchanged workflows (integrated mode), and a client for a running
`ditserve serve` (server mode). Drop this folder into ComfyUI's custom_nodes/ with ditserve installed in ComfyUI's
Python; see README.md beside this file."""

from .integrated_nodes import NODE_CLASS_MAPPINGS as _INTEGRATED
from .integrated_nodes import NODE_DISPLAY_NAME_MAPPINGS as _INTEGRATED_NAMES
from .server_nodes import NODE_CLASS_MAPPINGS as _SERVER
from .server_nodes import NODE_DISPLAY_NAME_MAPPINGS as _SERVER_NAMES

NODE_CLASS_MAPPINGS = {**_INTEGRATED, **_SERVER}
NODE_DISPLAY_NAME_MAPPINGS = {**_INTEGRATED_NAMES, **_SERVER_NAMES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
