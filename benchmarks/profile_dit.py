"""Profile one FLUX.1 DiT forward (ours and diffusers', same dummy weights) and print where CUDA time goes.

python benchmarks/profile_dit.py [--preset flux.1-dev] [--size 1024] [--rows 25]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ditserve.loader.folder import load_dit, resolve_model
from ditserve.models.flux import FluxConfig, FluxTransformer, map_diffusers_key
from ditserve.pipelines.flux import diffusers_transformer_sharing, latent_image_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux.1-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25)
    ns = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    source = resolve_model(ns.preset, "dummy")
    cfg = FluxConfig.from_dict(source.config("transformer"))
    ours = load_dit(source, "transformer", lambda: FluxTransformer(cfg), map_diffusers_key, device, dtype, "dummy")
    theirs = diffusers_transformer_sharing(ours)
    side = ns.size // 16
    inputs = dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, cfg.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        img_ids=latent_image_ids(side, side, device, dtype),
        txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device) if cfg.guidance_embeds else None,
    )
    for name, fn in (("ditserve", lambda: ours(**inputs)), ("diffusers", lambda: theirs(**inputs, return_dict=False))):
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        print(f"==== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=ns.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
