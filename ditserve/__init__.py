"""ditserve: fast inference and serving for diffusion transformers.

The public names are imported on first use (PEP 562), so `import ditserve` imports neither torch nor the model
stack: the HTTP process and `ditserve --help` need neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ditserve.config import ConfigError, EngineArgs, SamplingParams
    from ditserve.engine.engine import Engine, GenerationResult
    from ditserve.errors import LoaderError

__all__ = ["ConfigError", "Engine", "EngineArgs", "GenerationResult", "LoaderError", "SamplingParams"]
__version__ = "0.1.0"

# Each public name → the module that defines it.
_HOMES = {
    "ConfigError": "ditserve.config",
    "EngineArgs": "ditserve.config",
    "SamplingParams": "ditserve.config",
    "Engine": "ditserve.engine.engine",
    "GenerationResult": "ditserve.engine.engine",
    "LoaderError": "ditserve.errors",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ditserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
