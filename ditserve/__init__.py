"""ditserve: fast inference and serving for diffusion transformers."""

from ditserve.config import ConfigError, EngineArgs, SamplingParams
from ditserve.engine.engine import Engine, GenerationResult
from ditserve.loader.weights import LoaderError

__all__ = ["ConfigError", "Engine", "EngineArgs", "GenerationResult", "LoaderError", "SamplingParams"]
__version__ = "0.1.0"
