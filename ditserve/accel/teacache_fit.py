"""Fit TeaCache's rescale polynomial for one checkpoint: `python -m ditserve.accel.teacache_fit --model FOLDER`.

TeaCache skips the block loop while the accumulated change of the first block's timestep-modulated input stays
small; how much the loop's output changes for a given input change depends on the model. This runs the model
uncached over prompts and seeds, records at every step of every branch (per sample) the relative L1 change of the
modulated input x and of the block loop's residual y since the previous step, and fits y ≈ poly(x) by least squares
(highest power first, as `CacheConfig.teacache_coefficients` takes it). `--write` stores the coefficients in the
folder's ditserve.json, where the engine reads them as the model's default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ditserve.layers.blocks import LoopStep, State, run_steps


def _per_row_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    num = (new.float() - old.float()).abs().flatten(1).sum(1)
    return num / old.float().abs().flatten(1).sum(1).clamp_min(1e-12)


class ChangeRecorder:
    """A block-loop hook that runs every block and records (input change, output change) pairs per branch."""

    def __init__(self) -> None:
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls_in_step = 0
        self.pairs: list[tuple[float, float]] = []

    def new_request(self) -> None:
        self.previous.clear()
        self.calls_in_step = 0

    def end_step(self, *_: int) -> None:
        self.calls_in_step = 0

    def __call__(self, steps: list[LoopStep], state: State, signal) -> State:
        if signal is None:
            raise ValueError("this model's block loop gives no modulated input (signal=)")
        key = self.calls_in_step
        self.calls_in_step += 1
        modulated = signal()
        out = run_steps(steps, state)
        base = state
        for step in steps:  # the input in the output's form: through the glue only
            if step.block is None:
                base = step.run(base)
        residual = out[0] - base[0]
        if key in self.previous:
            old_modulated, old_residual = self.previous[key]
            x = _per_row_change(modulated, old_modulated)
            y = _per_row_change(residual, old_residual)
            self.pairs.extend(zip(x.tolist(), y.tolist()))
        self.previous[key] = (modulated, residual)
        return out


def fit(xs: np.ndarray, ys: np.ndarray, degree: int) -> list[float]:
    return [float(c) for c in np.polyfit(xs, ys, degree)]


def main(argv: list[str] | None = None) -> int:
    from ditserve import Engine

    p = argparse.ArgumentParser(prog="python -m ditserve.accel.teacache_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the built-in digits model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--prompt", action="append", default=None, help="repeatable (default: the ten digits)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 for every prompt")
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument(
        "--degree",
        type=int,
        default=2,
        help="2 by default: higher degrees can go negative between the measured changes",
    )
    p.add_argument("--write", action="store_true", help="store the coefficients in the folder's ditserve.json")
    ns = p.parse_args(argv)

    engine = Engine.from_pretrained(ns.model, device=ns.device, dtype=ns.dtype, load_format=ns.load_format)
    recorder = ChangeRecorder()
    models = list(engine.pipeline.transformers().values())
    for model in models:
        model.block_loop.hook = recorder
    prompts = ns.prompt or [f"the digit {d}" for d in range(10)]
    extra = {k: getattr(ns, k) for k in ("num_inference_steps", "height", "width", "num_frames") if getattr(ns, k)}
    try:
        for seed in range(ns.seeds):
            recorder.new_request()
            engine.generate(prompts, seed=seed, output_type="latent", on_step=recorder.end_step, **extra)
    finally:
        for model in models:
            model.block_loop.hook = None
    xs, ys = (np.asarray(v) for v in zip(*recorder.pairs))
    coefficients = fit(xs, ys, ns.degree)
    residual = float(np.sqrt(np.mean((np.polyval(coefficients, xs) - ys) ** 2)))
    print(
        json.dumps(
            {"model": engine.model_name, "pairs": len(xs), "rms_error": residual, "teacache_coefficients": coefficients}
        )
    )
    if ns.write:
        folder = engine.source.folder
        if folder is None:
            raise SystemExit("--write needs a model folder")
        path = Path(folder) / "ditserve.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["teacache_coefficients"] = coefficients
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
