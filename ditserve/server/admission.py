"""Admission by cost: what a request will cost is known before it is queued, and what is over a limit is refused
with a 400 that names the field to change.

Four limits, each a flag of `ditserve serve`; the ones not given default to what suits the worker's device:
- `--max-pixels`: width × height of one image (CPU 1024², CUDA 4096²);
- `--max-frames`: frames of one clip (CPU 33, CUDA 1025);
- `--max-steps`: denoising steps (200);
- `--max-request-seconds`: the estimated run time (engine/cost.py) of the request alone, queue not counted (default:
  the request timeout, since a request estimated past it would be answered 504 anyway; 0 turns the estimate off).
The estimate leans low (its speed is measured on the model's fastest work), so a request is refused only when even
it is over the limit; one that runs longer than it should is still stopped at its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ditserve.config import MAX_FRAMES, MAX_SIDE, SamplingParams
from ditserve.engine.cost import CostModel, request_shape
from ditserve.engine.messages import params_to_dict
from ditserve.server.schemas import InvalidRequest

DEFAULT_MAX_STEPS = 200


@dataclass
class RequestLimits:
    max_pixels: int | None = None  # None: the device's default
    max_frames: int | None = None
    max_steps: int | None = None
    max_request_seconds: float | None = None  # None: the request timeout; 0: no estimate


# The defaults by device type: a CPU server does not take what it would compute for hours.
DEVICE_LIMITS = {
    "cpu": RequestLimits(max_pixels=1024 * 1024, max_frames=33, max_steps=DEFAULT_MAX_STEPS),
    "cuda": RequestLimits(max_pixels=MAX_SIDE * MAX_SIDE, max_frames=MAX_FRAMES, max_steps=DEFAULT_MAX_STEPS),
}


def resolve_limits(limits: RequestLimits, device: str, request_timeout: float) -> RequestLimits:
    """Every limit filled: the flags given, the device's defaults for the others."""
    base = DEVICE_LIMITS["cuda" if device.startswith("cuda") else "cpu"]
    return RequestLimits(
        max_pixels=limits.max_pixels if limits.max_pixels is not None else base.max_pixels,
        max_frames=limits.max_frames if limits.max_frames is not None else base.max_frames,
        max_steps=limits.max_steps if limits.max_steps is not None else base.max_steps,
        max_request_seconds=(limits.max_request_seconds if limits.max_request_seconds is not None else request_timeout),
    )


class OverLimit(InvalidRequest):
    """A request over one of the limits; `reason` is the limit's name, as the metrics count it."""

    def __init__(self, reason: str, param: str, message: str):
        super().__init__(param, message, f"{reason}_exceeded")
        self.reason = reason


def admit(
    params: SamplingParams,
    defaults: dict,
    limits: RequestLimits,
    cost: CostModel | None,
    size_param: str = "size",
    frames_param: str = "num_frames",
) -> float | None:
    """Check a request (defaults not yet filled in) against the limits; its estimated seconds (None without a cost
    model), or OverLimit naming the field: `size_param` for the size, `frames_param` for the frames."""
    shape = request_shape(params_to_dict(params), defaults)
    width = params.width or defaults.get("width")
    height = params.height or defaults.get("height")
    if limits.max_steps is not None and shape.steps > limits.max_steps:
        raise OverLimit(
            "max_steps",
            "num_inference_steps",
            f"{shape.steps} steps is over this server's limit of {limits.max_steps} (--max-steps)",
        )
    if limits.max_pixels is not None and shape.pixels > limits.max_pixels:
        raise OverLimit(
            "max_pixels",
            size_param,
            f"{width}x{height} is {shape.pixels} pixels, over this server's limit of {limits.max_pixels} "
            f"(--max-pixels; {_side(limits.max_pixels)}² at most)",
        )
    if limits.max_frames is not None and shape.frames is not None and shape.frames > limits.max_frames:
        raise OverLimit(
            "max_frames",
            frames_param,
            f"{shape.frames} frames is over this server's limit of {limits.max_frames} (--max-frames)",
        )
    if cost is None:
        return None
    seconds = cost.seconds(shape)
    if limits.max_request_seconds and seconds > limits.max_request_seconds:
        # Name the field that grew the most against the model's defaults: the one to change first.
        usual = request_shape(
            params_to_dict(replace(params, height=None, width=None, num_inference_steps=None)), defaults
        )
        growth = {
            size_param: shape.pixels / max(1, usual.pixels),
            "num_inference_steps": shape.steps / max(1, usual.steps),
            "n": float(params.num_images),
        }
        param = max(growth, key=lambda name: growth[name])
        raise OverLimit(
            "max_request_seconds",
            param,
            f"{width}x{height}, {shape.steps} step(s), {shape.images} image(s) would take about {seconds:.0f} s on "
            f"this server, over its limit of {limits.max_request_seconds:g} s (--max-request-seconds); ask for a "
            "smaller size, fewer steps or fewer images",
        )
    return seconds


def _side(pixels: int) -> int:
    return int(pixels**0.5)
