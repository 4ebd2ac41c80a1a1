"""Profile one DiT forward of any preset (ours and diffusers', the same dummy weights and inputs) and print where
CUDA time goes, as the family's pipeline feeds it (`Pipeline.forward_inputs`).

python benchmarks/profile_dit.py [--model flux.1-dev] [--size 1024 | --height H --width W] [--num-frames N] [--rows 25]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ditserve import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux.1-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--height", type=int, help="default: --size")
    ap.add_argument("--width", type=int, help="default: --size")
    ap.add_argument("--num-frames", type=int, help="video models: default the model's")
    ap.add_argument("--rows", type=int, default=25)
    ns = ap.parse_args()
    engine = Engine.from_pretrained(ns.model, load_format="dummy", device="cuda", cuda_graphs=False)
    pipeline = engine.pipeline
    ours = next(iter(pipeline.transformers().values()))
    size = {"num_frames": ns.num_frames} if ns.num_frames else {}
    inputs = pipeline.forward_inputs(ns.height or ns.size, ns.width or ns.size, **size)
    theirs = pipeline.diffusers_pipeline().transformer
    their_inputs = pipeline.diffusers_forward_inputs(inputs)
    for name, fn in (
        ("ditserve", lambda: ours(**inputs)),
        ("diffusers", lambda: theirs(**their_inputs, return_dict=False)),
    ):
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
