"""Time LoRA set/merge/unmerge on a full-size model, and the per-step cost of dynamic vs merged LoRA.

    python benchmarks/lora_bench.py                       # flux.1-dev, dummy weights, rank 64, cuda, bf16
    python benchmarks/lora_bench.py --backup-device cuda  # keep W0 on the GPU instead of the host during a merge
    python benchmarks/lora_bench.py --model tiny-flux --load-format auto --device cpu --rank 4 --height 64 --width 64

The LoRA covers every linear of the transformer (diffusers naming, the layout diffusers' trainers write), random
rank-`--rank` weights, written to a temporary .safetensors file first so that `set_lora` includes reading it. Prints
a Markdown table to paste into benchmarks/RESULTS.md (with the GPU, torch version and date) and can write JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ditserve import Engine
from ditserve.models.flux import to_diffusers_state_dict


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def write_lora(engine: Engine, rank: int, path: Path) -> tuple[int, int]:
    """A rank-`rank` LoRA on every 2-D weight of the transformer; returns (modules, bytes)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, w in to_diffusers_state_dict(engine.pipeline.c.transformer).items():
        if not name.endswith(".weight") or w.dim() != 2:
            continue
        module = name.removesuffix(".weight")
        out_f, in_f = w.shape
        tensors[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).bfloat16()
        tensors[f"transformer.{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
    save_file(tensors, str(path))
    return len(tensors) // 2, path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--backup-device", default="cpu", help="where W0 is kept during a merge: cpu or cuda")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per timed generation (0: skip)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format)
    engine.lora.backup_device = args.backup_device
    device = engine.device
    results: dict = {"model": args.model, "rank": args.rank, "dtype": str(engine.dtype), "device": str(device)}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    results["torch"] = torch.__version__

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        results["modules"], results["file_mb"] = write_lora(engine, args.rank, path)
        results["file_mb"] = round(results["file_mb"] / 2**20, 1)
        results["set_lora_s"], _ = timed(lambda: engine.set_lora("bench", str(path), 1.0), device)
    results["set_lora_loaded_s"], _ = timed(lambda: engine.set_lora("bench", strength=0.8), device)
    results["merge_s"], _ = timed(lambda: engine.merge_lora_weights(), device)
    results["remerge_s"], _ = timed(lambda: engine.merge_lora_weights(strength=0.5), device)
    results["unmerge_s"], _ = timed(lambda: engine.unmerge_lora_weights(), device)

    if args.steps:
        call = dict(prompt="a red fox", height=args.height, width=args.width, num_inference_steps=args.steps, seed=0)

        def per_step() -> float:
            engine.generate(**call)  # warm-up (kernels, allocator)
            steps = engine.generate(**call).timings["steps"]
            return sum(steps) / len(steps)

        results["step_base_s"] = per_step()
        engine.set_lora("bench", strength=1.0)
        results["step_dynamic_s"] = per_step()
        engine.merge_lora_weights()
        results["step_merged_s"] = per_step()
        engine.unmerge_lora_weights()

    for k, v in results.items():
        if isinstance(v, float):
            results[k] = round(v, 4)
    print(json.dumps(results, indent=2))
    cols = ["set_lora_s", "set_lora_loaded_s", "merge_s", "remerge_s", "unmerge_s"]
    cols += [c for c in ("step_base_s", "step_dynamic_s", "step_merged_s") if c in results]
    print("\n| " + " | ".join(["model", "rank", "W0 backup", *cols]) + " |")
    print("|" + " --- |" * (3 + len(cols)))
    row = [args.model, str(args.rank), args.backup_device, *(str(results[c]) for c in cols)]
    print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
