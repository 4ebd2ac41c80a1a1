"""One pipeline per model family; a family's `ModelSpec` (registry.py) names its class."""

from __future__ import annotations

from ditserve.pipelines.base import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput"]
