"""One DiT forward of a preset at full size on dummy weights, in each speed configuration that one copy of the
weights can run: ours in bf16 with cuDNN attention (and sage where its package imports), diffusers' eager forward
of the same tensors, then ours again after quantising its linears to FP8 in place, with each attention.

One engine is built and nothing is generated, so a 14B model fits in a short device call; `ditserve bench` builds
an engine per configuration (FP8, bf16, diffusers) and runs whole generations.

    python benchmarks/dit_forward.py --model wan2.1-t2v-14b --height 480 --width 832 --num-frames 81 --json f.json

Prints per configuration: the forward's median milliseconds (CUDA events, eager: no CUDA graphs, which matter
little for forwards of seconds), its ratio to diffusers' eager forward, and the output's relative L2 difference from
diffusers' (yardstick: diffusers with flash attention against its default, what two bf16 kernels disagree by).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditserve import Engine
from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device, has_fp8_tensor_cores, quantize_dit
from ditserve.bench import _time_calls
from ditserve.layers.attention import set_attention_backend
from ditserve.layers.sage_attention import sage_available


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_diffusers(pipeline, inputs: dict, device: torch.device, iters: int):
    """diffusers' eager forward of our DiT's tensors: (median ms, its output, its output with flash attention)."""
    theirs = pipeline.diffusers_pipeline().transformer
    their_inputs = pipeline.diffusers_forward_inputs(inputs)
    with torch.no_grad():
        ms = 1000 * _time_calls(lambda: theirs(**their_inputs, return_dict=False), device, warmup=1, iters=iters)
        out = theirs(**their_inputs, return_dict=False)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]):
            flash = theirs(**their_inputs, return_dict=False)
    return ms, out, flash


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-14b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--num-frames", type=int, help="video models: default the model's")
    ap.add_argument("--device", default="cuda", help="cuda (what is measured) or cpu (a tiny folder, to try it)")
    ap.add_argument("--iters", type=int, default=3, help="timed forwards per configuration (after one warm-up)")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=None,
        help="our attention backends to time (default: cudnn, sage if it imports, fp8 on GPUs with FP8 tensor cores)",
    )
    ap.add_argument("--json", help="write the report here too")
    ns = ap.parse_args()

    t0 = time.perf_counter()
    # Only the DiT is timed: the text encoders and VAE wait on the host (FLUX.2-dev's 24B text encoder beside its
    # 32B DiT would not leave room for diffusers' forward).
    engine = Engine.from_pretrained(
        ns.model,
        load_format="dummy",
        device=ns.device,
        cuda_graphs=False,
        text_encoder_cpu_offload=True,
        image_encoder_cpu_offload=True,
        vae_cpu_offload=True,
    )
    device, pipeline = engine.device, engine.pipeline
    model = next(iter(pipeline.transformers().values()))
    frames = {"num_frames": ns.num_frames} if ns.num_frames else {}
    inputs = pipeline.forward_inputs(ns.height, ns.width, **frames)
    report: dict = dict(
        model=ns.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        height=ns.height,
        width=ns.width,
        num_frames=ns.num_frames,
        engine_build_s=time.perf_counter() - t0,
        results={},
    )
    print(f"{ns.model}: engine built in {report['engine_build_s']:.1f} s", flush=True)
    fp8_cores = has_fp8_tensor_cores(device)
    attentions = ns.attention or ["cudnn", *(["sage"] if sage_available() else []), *(["fp8"] if fp8_cores else [])]
    ours_outputs: dict[str, torch.Tensor] = {}

    def time_ours(label: str) -> None:
        for backend in attentions:
            set_attention_backend(model, backend, device)
            with torch.no_grad():
                ms = 1000 * _time_calls(lambda: model(**inputs), device, warmup=1, iters=ns.iters)
                ours_outputs[f"{label} {backend}"] = model(**inputs)
            report["results"][f"{label} {backend}"] = dict(forward_ms=ms)
            print(f"{label} {backend}: {ms:.1f} ms", flush=True)

    plain = str(engine.dtype).replace("torch.", "")
    time_ours(f"ditserve {plain}")
    ms, their_out, their_flash = time_diffusers(pipeline, inputs, device, ns.iters)
    report["results"]["diffusers eager"] = dict(forward_ms=ms)
    print(f"diffusers eager: {ms:.1f} ms", flush=True)
    reference = pipeline.comparable_outputs(ours_outputs[f"ditserve {plain} {attentions[0]}"], their_out, inputs)[1]
    flash = pipeline.comparable_outputs(ours_outputs[f"ditserve {plain} {attentions[0]}"], their_flash, inputs)[1]
    report["diffusers_flash_vs_default"] = rel(flash, reference)
    del their_out, their_flash, flash
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # diffusers' module held our bf16 tensors: quantising in place frees them

    try:
        check_fp8_device(device)
        quantize_dit(model)
        time_ours("ditserve fp8")
    except FP8Unsupported as e:
        print(f"no FP8 rows: {e}")
    diffusers_ms = report["results"]["diffusers eager"]["forward_ms"]
    for label, out in ours_outputs.items():
        row = report["results"][label]
        row["ratio_to_diffusers"] = row["forward_ms"] / diffusers_ms
        row["rel_vs_diffusers"] = rel(pipeline.comparable_outputs(out, (reference,), inputs)[0], reference)
    report["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    report["total_s"] = time.perf_counter() - t0

    print(
        f"\n{ns.model} {ns.height}x{ns.width}{' x ' + str(ns.num_frames) if ns.num_frames else ''} on {report['device']}"
    )
    print(f"{'configuration':<24} {'fwd ms':>9} {'/ diffusers':>12} {'rel. diff':>10}")
    for label, row in report["results"].items():
        ratio, diff = row.get("ratio_to_diffusers", 1.0), row.get("rel_vs_diffusers")
        print(f"{label:<24} {row['forward_ms']:>9.1f} {ratio:>11.2f}x {'' if diff is None else f'{diff:.2e}':>10}")
    print(
        f"yardstick: diffusers flash vs its default {report['diffusers_flash_vs_default']:.2e}; "
        f"engine build {report['engine_build_s']:.1f} s, total {report['total_s']:.1f} s, peak {report['peak_gib']:.1f} GiB"
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
