"""One pipeline per model family."""

from __future__ import annotations

from ditserve.pipelines.base import Pipeline, PipelineOutput


def pipeline_class(family: str) -> type[Pipeline]:
    if family == "flux":
        from ditserve.pipelines.flux import FluxPipeline

        return FluxPipeline
    raise KeyError(f"no pipeline for model family {family!r}")


__all__ = ["Pipeline", "PipelineOutput", "pipeline_class"]
