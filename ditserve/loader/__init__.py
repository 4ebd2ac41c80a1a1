"""Reading diffusers model folders: the DiT into our modules, everything else through diffusers/transformers."""

from ditserve.errors import LoaderError

__all__ = ["LoaderError"]
