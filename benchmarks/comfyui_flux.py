"""FLUX.1-dev inside ComfyUI: ComfyUI's own loader against the ditserve loader node, same process, same weights.

Dummy weights at full size (bf16, BFL names, made on the GPU), 1024² (128² latents), 28 Euler steps with ComfyUI's
"simple" scheduler and FLUX guidance 3.5 at CFG 1, conditioning of T5's shape (512 × 4096) and CLIP's pooled (768):
the text encoders and the VAE are the same for both and not timed. Both MODELs are sampled by ComfyUI's own
`comfy.sample.sample` (what KSampler calls). Prints a Markdown table: per step (median of steps 2..28) and the whole
run, for each loader, and writes JSON with --json.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfyui_flux.py [--runs 2] [--compile] [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

NODES_DIR = Path(__file__).resolve().parent.parent / "comfyui"


def dummy_flux_dev_state_dict(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """FLUX.1-dev's tensors under BFL names with random values (N(0, 0.02) matrices, zero biases, unit scales)."""
    import comfy.ldm.flux.model
    import comfy.ops

    params = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                  mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])  # fmt: skip
    with torch.device("meta"):
        shapes = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **params).state_dict()
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, t in shapes.items():
        x = torch.empty(t.shape, device=device, dtype=dtype)
        if t.dim() >= 2:
            x.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("scale"):
            x.fill_(1.0)
        else:
            x.zero_()
        out[name] = x
    return out


def time_sampling(model, positive, negative, steps: int, seed: int = 0) -> dict:
    import comfy.sample

    latent = torch.zeros(1, 16, 128, 128)
    noise = comfy.sample.prepare_noise(latent, seed)
    stamps: list[float] = []

    def callback(step, x0, x, total):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    torch.cuda.synchronize()
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent, callback=callback,
                        disable_pbar=True, seed=seed)  # fmt: skip
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"total_s": total, "step_s": statistics.median(per_step), "first_step_s": stamps[0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per loader (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="ditserve: regional torch.compile")
    parser.add_argument("--cuda-graphs", action="store_true", help="ditserve: CUDA graphs")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if not comfyui_dir:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    sys.path[:0] = [comfyui_dir, str(NODES_DIR)]
    import comfy.model_management as mm
    import comfy.sd
    from ditserve_nodes.checkpoint import load_dit_from_state_dict
    from ditserve_nodes.integrated_nodes import _apply_options
    from ditserve_nodes.model import DiTHandle, comfy_model

    device, dtype = mm.get_torch_device(), torch.bfloat16
    sd = dummy_flux_dev_state_dict(device, dtype)
    ours = DiTHandle(load_dit_from_state_dict(sd, device, dtype))
    _apply_options(ours, {"attention_backend": args.attention_backend, "compile": args.compile,
                          "cuda_graphs": args.cuda_graphs})  # fmt: skip
    models = {
        "ComfyUI UNETLoader": comfy.sd.load_diffusion_model_state_dict(dict(sd)),
        "ditserve loader": comfy_model(ours),
    }
    del sd
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 512, 4096, generator=gen)
    pooled = torch.randn(1, 768, generator=gen)
    positive = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    results = {}
    for name, model in models.items():
        time_sampling(model, positive, negative, 2)  # warm-up: loading, kernels, compile
        runs = [time_sampling(model, positive, negative, args.steps, seed=i) for i in range(args.runs)]
        results[name] = {k: min(r[k] for r in runs) for k in runs[0]}
        mm.unload_all_models()
    print(f"FLUX.1-dev dummy weights, bf16, 1024x1024, {args.steps} steps, {torch.cuda.get_device_name()}")
    print("| loader | per step (s) | whole run (s) |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['total_s']:.2f} |")
    base, fast = results["ComfyUI UNETLoader"], results["ditserve loader"]
    print(
        f"speed-up per step {base['step_s'] / fast['step_s']:.2f}x, whole run {base['total_s'] / fast['total_s']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
