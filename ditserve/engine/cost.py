"""What a request will cost on this server, known before it is queued, so the server can refuse what it cannot finish.

A request's time is about: steps × (DiT forwards per step) × (one forward's work) + decode's work, over the device's
speed, plus the text encoding. The work is counted in floating-point operations, exactly: `measure` runs the
model's first DiT and its VAE decoder on the meta device (no memory, no arithmetic) under torch's FLOP counter at
three small sizes. Linear layers and convolutions are linear in the number of pixels and attention is quadratic, so
each cost is a polynomial of degree two in the pixels, which three sizes determine, and which then holds at any size
(4096² included, though it was measured at 32 latent tokens a side at most). The sizes are 8, 16 and 32 tokens a
side, so that models which pad their sequence to a multiple of 32 or 64 tokens are measured past the padding; a
fourth size checks the fit.

The device's speed is measured once, at load: one real DiT forward at a size that takes a good fraction of a second,
timed (its FLOPs over its time). With several ranks a forward on rank 0 alone would wait for the others, so a
matrix product in the model's dtype is timed instead and counted at half its speed per rank. Then every batch the
worker runs corrects the speed (its denoise time against its FLOPs), and its encode time gives the fixed cost.

A video model's forward costs what its latent tokens cost, whatever frames they come from, so a request with other
frames than the model's default is priced at the pixels that make as many latent tokens (pixels × its latent frames /
the default's, latent frames being (frames − 1) / the VAE's temporal factor + 1). For the same reason its forward is
counted and timed on one frame, and the polynomial rescaled to the default frames: the inputs of a forward are made
for real (an image-to-video model VAE-encodes its condition), and on all the default frames that alone can take
minutes on a CPU. Guidance runs two forwards per step when the request uses true CFG (a negative
prompt with true_cfg_scale > 1, as FLUX does), one otherwise (families that guide otherwise are estimated low).

This module imports torch only inside `measure`: the HTTP process prices requests without it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

MEASURE_TARGET_S = 0.05  # how long the timed forward would take at a matrix product's speed (it takes longer)
MEASURE_MAX_SIDE = 512  # the timed forward's largest side
CORRECTION_FLOOR_S = 0.05  # batches predicted shorter than this are all overhead: they do not correct the speed
SMOOTHING = 0.5  # weight of each new observation


def _poly(c: tuple[float, float, float] | list[float], x: float) -> float:
    return c[0] + c[1] * x + c[2] * x * x


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """The degree-two polynomial through three points (exact: the FLOP counts are such polynomials)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    # Newton's divided differences.
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    c2 = (d12 - d01) / (x2 - x0)
    c1 = d01 - c2 * (x0 + x1)
    c0 = y0 - c1 * x0 - c2 * x0 * x0
    return c0, c1, max(0.0, c2)


@dataclass
class CostModel:
    dit: tuple[float, float, float]  # FLOPs of one DiT forward of one image, a polynomial in its pixels
    decode: tuple[float, float, float]  # FLOPs of decoding one image
    flops_per_s: float  # the DiT's speed on this device
    decode_flops_per_s: float  # the decoder's (starts as the DiT's; corrected apart)
    fixed_s: float = 0.0  # text encoding and latents, per batch (learned from the batches run)
    method: str = "timed forward"  # how flops_per_s was first measured
    frames: int | None = None  # the frame count the polynomials were measured at (video models; None for images)
    temporal: int = 1  # frames per latent frame (the VAE's temporal factor)

    def effective_pixels(self, shape: Shape) -> float:
        """Pixels of one image of the measured kind that make as many latent tokens as the request's."""
        base = self.frames or 1
        frames = shape.frames or base
        return shape.pixels * _latent_frames(frames, self.temporal) / _latent_frames(base, self.temporal)

    # ---- pricing ------------------------------------------------------------------------------------------------
    def step_flops(self, pixels: int, images: int, passes: int) -> float:
        return images * passes * _poly(self.dit, pixels)

    def seconds(self, shape: Shape) -> float:
        """Estimated seconds to run a request (or a batch: `shape.images` summed over it)."""
        p = self.effective_pixels(shape)
        denoise = shape.steps * self.step_flops(p, shape.images, shape.passes) / self.flops_per_s
        decode = shape.images * _poly(self.decode, p) / self.decode_flops_per_s
        return self.fixed_s + denoise + decode

    # ---- learning from the batches run --------------------------------------------------------------------------
    def observe(self, shape: Shape, timings: dict) -> None:
        """Correct the speeds with a batch's stage timings (seconds: encode, prepare, denoise, decode)."""
        pixels = self.effective_pixels(shape)
        denoise = timings.get("denoise")
        if isinstance(denoise, int | float):
            predicted = shape.steps * self.step_flops(pixels, shape.images, shape.passes) / self.flops_per_s
            if predicted >= CORRECTION_FLOOR_S and denoise > 0:
                self.flops_per_s = _blend(self.flops_per_s, self.flops_per_s * predicted / denoise)
        decode = timings.get("decode")
        if isinstance(decode, int | float):
            predicted = shape.images * _poly(self.decode, pixels) / self.decode_flops_per_s
            if predicted >= CORRECTION_FLOOR_S and decode > 0:
                self.decode_flops_per_s = _blend(self.decode_flops_per_s, self.decode_flops_per_s * predicted / decode)
        fixed = sum(
            timings.get(stage, 0.0) for stage in ("encode", "prepare") if isinstance(timings.get(stage), int | float)
        )
        self.fixed_s = fixed if self.fixed_s == 0.0 else (1 - SMOOTHING) * self.fixed_s + SMOOTHING * fixed

    # ---- crossing the process boundary --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(
            dit=tuple(data["dit"]),
            decode=tuple(data["decode"]),
            flops_per_s=float(data["flops_per_s"]),
            decode_flops_per_s=float(data["decode_flops_per_s"]),
            fixed_s=float(data.get("fixed_s", 0.0)),
            method=str(data.get("method", "")),
            frames=data.get("frames"),
            temporal=int(data.get("temporal", 1)),
        )


def _latent_frames(frames: int, temporal: int) -> int:
    return (frames - 1) // temporal + 1 if temporal > 1 else frames


@dataclass
class Shape:
    """What a request asks of the model, as far as its cost goes."""

    pixels: int  # per image (and frame)
    steps: int
    images: int
    passes: int  # DiT forwards per image per step
    frames: int | None


def request_shape(params: dict, defaults: dict) -> Shape:
    """The shape of a request from its parameters (`messages.params_to_dict`), the model's defaults filling the
    unset ones as the pipeline does."""

    def get(name: str):
        value = params.get(name)
        return value if value is not None else defaults.get(name)

    prompt = params.get("prompt")
    prompts = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    cfg = get("true_cfg_scale")
    true_cfg = get("negative_prompt") is not None and cfg is not None and cfg > 1
    return Shape(
        pixels=int(get("height") or 0) * int(get("width") or 0),
        steps=int(get("num_inference_steps") or 1),
        images=prompts * int(params.get("num_images") or 1),
        passes=2 if true_cfg else 1,
        frames=get("num_frames"),
    )


def _blend(old: float, new: float) -> float:
    """Geometric smoothing: one odd batch moves the speed by at most a factor of sqrt(4)."""
    ratio = min(4.0, max(0.25, new / old))
    return old * ratio**SMOOTHING


# ---- measuring, in the worker ---------------------------------------------------------------------------------------
def measure(engine) -> CostModel:
    """The cost model of an engine's model on its device (in the worker, once it has loaded)."""
    import torch

    pipe = engine.pipeline
    if not pipe.spec.dits:
        raise ValueError("the model runs no DiT of ours (the diffusers backend): its FLOPs are not counted")
    m = pipe.spatial_multiple  # one latent token a side
    sides = [8 * m, 16 * m, 32 * m]
    pixels = [s * s for s in sides]
    dit = _fit(pixels, [_dit_flops(engine, s) for s in sides])
    check = _dit_flops(engine, 24 * m)
    if abs(_poly(dit, (24 * m) ** 2) - check) > 0.02 * check:
        raise ValueError(f"the DiT's FLOPs are not a quadratic in its pixels ({check:.4g} at {24 * m}²)")
    frames = pipe.defaults().num_frames
    temporal = int(getattr(pipe, "vae_scale_temporal", 1) or 1)
    try:
        decode = _fit(pixels, [_decode_flops(pipe, s) for s in sides])
    except Exception:  # noqa: BLE001 - a decoder this cannot price costs "nothing": the DiT dominates anyway
        decode = (0.0, 0.0, 0.0)
    world = engine.parallel.world_size
    if world == 1:
        rate, method = _timed_forward(engine, dit, torch)
    else:
        rate, method = 0.5 * world * _matmul_rate(engine, torch), f"matmul × 0.5 × {world} ranks"
    if _is_video(pipe):  # counted on one frame: the default's latent frames make that many times the tokens
        tokens = _latent_frames(frames, temporal)
        dit = (dit[0], dit[1] * tokens, dit[2] * tokens * tokens)
    return CostModel(
        dit=dit,
        decode=decode,
        flops_per_s=rate,
        decode_flops_per_s=rate,
        method=method,
        frames=frames,
        temporal=temporal,
    )


def _is_video(pipe) -> bool:
    return pipe.spec.output == "video"


def _forward_inputs(pipe, side: int) -> dict:
    """The DiT's inputs at side × side; a video model's on one frame."""
    return pipe.forward_inputs(side, side, num_frames=1) if _is_video(pipe) else pipe.forward_inputs(side, side)


def _flop_counter(torch):
    """torch's FLOP counter, taught the CPU's SDPA kernel (it knows the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _meta_inputs(inputs: dict, torch) -> dict:
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _dit_flops(engine, side: int) -> float:
    import torch

    from ditserve.registry import load_object

    pipe = engine.pipeline
    dit = pipe.spec.dits[0]
    with torch.device("meta"):
        model = load_object(dit.model).from_config(engine.source.config(dit.component))
    model = model.to(pipe.dtype)
    inputs = _meta_inputs(_forward_inputs(pipe, side), torch)
    with torch.no_grad(), _flop_counter(torch) as counter:
        model(**inputs)
    return float(counter.get_total_flops())


def _decode_flops(pipe, side: int) -> float:
    """FLOPs of decoding one image (a video model's: one clip of its default frames) of side × side."""
    import torch

    vae = pipe.vae
    config = vae.config
    factor = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_spatial", None)
    if factor is None:
        factor = 2 ** (len(config.block_out_channels) - 1)
    with torch.device("meta"):
        model = type(vae).from_config(config)
    if "z_dim" in config:  # a video VAE (Wan's): latents [batch, channels, frames, height, width]
        frames = _latent_frames(pipe.defaults().num_frames or 1, int(getattr(pipe, "vae_scale_temporal", 1) or 1))
        shape: tuple = (1, config.z_dim, frames, side // factor, side // factor)
    else:
        shape = (1, config.latent_channels, side // factor, side // factor)
    latent = torch.empty(shape, device="meta")
    with torch.no_grad(), _flop_counter(torch) as counter:  # in float32: the count does not depend on the dtype
        model.decode(latent)
    return float(counter.get_total_flops())


def _matmul_rate(engine, torch) -> float:
    """FLOP/s of a square matrix product in the model's dtype on its device."""
    device, dtype = engine.device, engine.dtype
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(3):
        _sync(device, torch)
        start = time.perf_counter()
        a @ a
        _sync(device, torch)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _timed_forward(engine, dit_poly: tuple[float, float, float], torch) -> tuple[float, str]:
    """FLOP/s of one real forward of the DiT, at the size whose forward takes about MEASURE_TARGET_S."""
    import contextlib

    pipe = engine.pipeline
    m = pipe.spatial_multiple
    guess = _matmul_rate(engine, torch)
    side = m
    while side + m <= MEASURE_MAX_SIDE and _poly(dit_poly, (side + m) ** 2) / guess < MEASURE_TARGET_S:
        side += m
    model = next(iter(pipe.transformers().values()))
    inputs = _forward_inputs(pipe, side)
    eager = getattr(torch.compiler, "set_stance", None)
    with eager("force_eager") if eager is not None else contextlib.nullcontext(), torch.inference_mode():
        seconds = _timed(model, inputs, engine.device, torch)  # warm-up (with CUDA graphs: the capture)
        if seconds < 1.0:  # cheap enough to run again: the second run is the one that counts, as served
            seconds = _timed(model, inputs, engine.device, torch)
    return _poly(dit_poly, side * side) / seconds, f"timed forward at {side}x{side}"


def _timed(model, inputs: dict, device, torch) -> float:
    _sync(device, torch)
    start = time.perf_counter()
    model(**inputs)
    _sync(device, torch)
    return time.perf_counter() - start


def _sync(device, torch) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
