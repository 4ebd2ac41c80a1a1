"""`ditserve generate | bench | make-tiny | serve | bench-serve` (serve and bench-serve are set up in server/cli.py).

Errors a user can fix (a bad flag, a missing folder) print one line on stderr and exit with status 2; nothing
prints a traceback unless DITSERVE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from ditserve.cli_common import (
    CliParser,
    UsageError,
    add_engine_flags,
    add_lora_flags,
    add_profile_flags,
    apply_lora_flags,
    engine_args_from,
    field_to_flag,
    lora_request,
    profile_request,
    quiet_libraries,
)
from ditserve.config import ConfigError
from ditserve.errors import LoaderError
from ditserve.registry import DEFAULT_BENCH_MODEL


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--true-cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument(
        "--sampling-preset",
        default=None,
        metavar="NAME",
        help="a named way of sampling of the model's family (e.g. Wan's lightx2v-4step, for LightX2V's 4-step LoRAs)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a setting of the model's own (repeatable; VALUE is JSON, else a string): a native family's (Wan: "
        "sampler=euler, flow_shift=5), or a diffusers pipeline's __call__ parameter with the diffusers backend "
        "(e.g. use_resolution_binning=false)",
    )
    video = p.add_argument_group("video and image-conditioned models")
    video.add_argument("--num-frames", type=int, default=None, help="frames of the clip (video models; 4k+1 for Wan)")
    video.add_argument("--fps", type=int, default=None, help="frame rate of the written clip (default: the model's)")
    video.add_argument(
        "--guidance-scale-2", type=float, default=None, help="guidance of the second expert (Wan2.2 A14B)"
    )
    video.add_argument(
        "--image", action="append", default=None, help="input image (image-to-video, edits); repeat for several"
    )


def parse_options(pairs: list[str] | None) -> dict | None:
    """--option NAME=VALUE flags as an options dict: VALUE read as JSON (numbers, true/false, null), else a string."""
    if not pairs:
        return None
    options: dict = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"ditserve: --option: {pair!r} is not NAME=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[name.strip()] = value
    return options


def _format_summary(result, paths) -> str:
    made = f"{len(result.videos)} video(s)" if result.videos else f"{len(result.images)} image(s)"
    t = result.timings
    steps = t.get("steps") or []
    per_step = f"; {sum(steps) / len(steps):.3f} s/step" if steps else ""
    stages = ", ".join(f"{k} {t[k]:.2f} s" for k in ("encode", "prepare", "denoise", "decode") if k in t)
    peak = f"{result.peak_memory_mb:.0f} MiB" if result.peak_memory_mb is not None else "n/a on cpu"
    memory = result.memory or {}
    by_stage = {k: v for k, v in (memory.get("stages") or {}).items() if v is not None}
    if by_stage:
        peak += " (" + ", ".join(f"{k} {v:.0f}" for k, v in by_stage.items()) + ")"
    ranks = memory.get("ranks") or []
    if len(ranks) > 1 and all(r.get("peak_allocated_mb") is not None for r in ranks):
        peak += "; per rank " + ", ".join(f"{r['peak_allocated_mb']:.0f}" for r in ranks) + " MiB"
    wrote = ", ".join(str(p) for p in paths)
    cache = t.get("cache")
    cached = (
        f"; {cache['method']} skipped {cache['blocks_skipped']} of {cache['blocks_total']} block computations"
        if cache
        else ""
    )
    return (
        f"{made} in {t['total']:.2f} s ({stages}{per_step}){cached}; peak memory {peak}; seed {result.seed}; "
        f"wrote {wrote}"
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ditserve.config import SamplingParams
    from ditserve.engine.engine import Engine
    from ditserve.utils.media import image_format, numbered_paths, save_images
    from ditserve.utils.video import VIDEO_SUFFIXES, is_video_path

    def is_image_path(path: str) -> bool:
        try:
            image_format(os.path.splitext(path)[1])
        except ValueError:
            return False
        return True

    if ns.output is not None and not (is_image_path(ns.output) or is_video_path(ns.output)):
        raise UsageError(
            f"ditserve: --output: {ns.output!r}: use .png, .jpg or .webp for images, "
            f"{', '.join(VIDEO_SUFFIXES)} or a folder/ for videos"
        )
    for image in ns.image or []:
        if not os.path.isfile(image):
            raise UsageError(f"ditserve: --image: {image!r} is not a file")
    params = SamplingParams(
        prompt=ns.prompt,
        negative_prompt=ns.negative_prompt,
        height=ns.height,
        width=ns.width,
        num_inference_steps=ns.num_inference_steps,
        guidance_scale=ns.guidance_scale,
        true_cfg_scale=ns.true_cfg_scale,
        seed=ns.seed,
        num_images=ns.num_images,
        max_sequence_length=ns.max_sequence_length,
        num_frames=ns.num_frames,
        fps=ns.fps,
        images=ns.image,
        guidance_scale_2=ns.guidance_scale_2,
        sampling_preset=ns.sampling_preset,
        options=parse_options(ns.option),
    )
    params.validate(spatial_multiple=1)  # model-independent checks before the (slow) load
    lora_request(ns)
    profile = profile_request(ns)
    engine = Engine(engine_args_from(ns))
    if not engine.is_driver:  # another rank of a torchrun or multi-node launch: follow rank 0
        engine.follow()
        return 0
    if engine.backend != "native" or ns.backend != "auto":  # a folder's native family is the unremarkable case
        print(f"ditserve: {engine.source.describe_backend()}", file=sys.stderr)
    makes_video = engine.pipeline.spec.output == "video"
    output = ns.output or ("out.mp4" if makes_video else "out.png")
    if not (is_video_path(output) if makes_video else is_image_path(output)):
        engine.close()
        wanted = f"{', '.join(VIDEO_SUFFIXES)} or a folder/" if makes_video else ".png, .jpg or .webp"
        kind = "videos" if makes_video else "images"
        raise UsageError(f"ditserve: --output: this model makes {kind}: use {wanted}, not {output!r}")
    plan = engine.memory_plan
    if plan is not None and (plan.dit_layerwise_offload or plan.offloaded):
        print(f"memory: {plan.describe()}", file=sys.stderr)
    apply_lora_flags(engine, ns)
    bars: list[tqdm] = []

    def on_step(i: int, n: int) -> None:
        if not bars:  # created at the first step, so validation errors print without a bar
            bars.append(tqdm(total=n, desc="denoising", unit="step", file=sys.stderr, leave=False))
        bars[0].update(1)

    traces: list[str] = []
    try:
        if profile is not None:
            with engine.profile(**profile) as session:
                result = engine.run(params, on_step)
            traces = [str(path) for path in session.traces]
        else:
            result = engine.run(params, on_step)
    finally:
        for bar in bars:
            bar.close()
        engine.close()
    if result.videos:
        paths = [video.save(path) for video, path in zip(result.videos, numbered_paths(output, len(result.videos)))]
    else:
        paths = save_images(result.images, output)
    print(_format_summary(result, paths))
    for trace in traces:
        print(f"profile: {trace}")
    return 0


def cmd_make_tiny(ns: argparse.Namespace) -> int:
    from ditserve.registry import BACKEND_TINY_MODELS, load_object, specs

    spec = next((s for s in specs() if s.family == ns.family and s.make_tiny), None)
    if spec is None and ns.family in BACKEND_TINY_MODELS:  # a pipeline served through the diffusers backend
        given = [name for s in specs() for name in s.make_tiny_options if getattr(ns, name)]
        if given:
            raise UsageError(f"make-tiny: --{given[0].replace('_', '-')} is not an option of {ns.family}")
        path = load_object(BACKEND_TINY_MODELS[ns.family])(ns.dir)
        print(f"wrote a tiny random {ns.family} model (served by the diffusers backend) to {path}")
        return 0
    if spec is None:
        known = ", ".join([*(s.family for s in specs() if s.make_tiny), *BACKEND_TINY_MODELS])
        raise UsageError(f"make-tiny: unknown family {ns.family!r}; known: {known}")
    for other in {flag for s in specs() for flag in s.make_tiny_options} - set(spec.make_tiny_options):
        if getattr(ns, other):
            raise UsageError(f"make-tiny: --{other.replace('_', '-')} is not an option of {spec.family}")
    options = {name: getattr(ns, name) for name in spec.make_tiny_options}
    path = load_object(spec.make_tiny)(ns.dir, **options)  # type: ignore[arg-type]
    chosen = "".join(f" --{name.replace('_', '-')}" for name, on in options.items() if on)
    print(f"wrote a tiny random {spec.family} model{chosen} to {path}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from ditserve.bench import run_bench

    return run_bench(ns)


def _add_make_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    """The family and every family's own options (flags), from the registrations (plain data: no torch)."""
    from ditserve.registry import BACKEND_TINY_MODELS, specs

    families = [s for s in specs() if s.make_tiny]
    names = [*(s.family for s in families), *BACKEND_TINY_MODELS]
    parser.add_argument("family", help=f"model family ({', '.join(names)})")
    parser.add_argument("dir", help="output folder")
    helps: dict[str, list[str]] = {}
    for s in families:
        for name, text in s.make_tiny_options.items():
            helps.setdefault(name, []).append(f"{s.family}: {text}")
    for name, texts in helps.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help="; ".join(texts))


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="ditserve", description="Fast inference and serving for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)

    gen = sub.add_parser("generate", help="make images or videos from a prompt")
    add_engine_flags(gen)
    add_sampling_flags(gen)
    add_lora_flags(gen)
    add_profile_flags(gen)
    gen.add_argument(
        "--output",
        default=None,
        help="file to write: .png, .jpg, .webp for images (default out.png); .mp4, .gif, .webp or a folder/ of PNG "
        "frames for videos (default out.mp4); numbered if several",
    )
    gen.set_defaults(handler=cmd_generate)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model folder in diffusers layout")
    _add_make_tiny_arguments(tiny)
    tiny.set_defaults(handler=cmd_make_tiny)

    bench = sub.add_parser("bench", help="time ditserve against diffusers on the same GPU, same weights")
    add_engine_flags(bench)
    bench.set_defaults(model=DEFAULT_BENCH_MODEL, load_format="dummy")
    bench.add_argument("--height", type=int, default=1024)
    bench.add_argument("--width", type=int, default=1024)
    bench.add_argument("--num-inference-steps", type=int, default=None, help="default: the model's")
    bench.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    bench.add_argument("--negative-prompt", default=None, help="with a true-CFG model: time guided generation")
    bench.add_argument(
        "--image", action="append", default=None, help="an input image (edit and image-to-video models; repeatable)"
    )
    bench.add_argument("--num-frames", type=int, default=None, help="video models: default the model's")
    bench.add_argument("--repeat", type=int, default=2, help="timed generations per engine (after one warm-up)")
    bench.add_argument("--no-diffusers", action="store_true", help="time ditserve only")
    bench.add_argument("--json", default=None, help="write the results to this file")
    add_profile_flags(bench)
    for action in bench._actions:  # bench times one backend or several in one run: --backend native,diffusers
        if action.dest == "backend":
            action.choices = None
            action.help = f"{action.help}; several comma-separated (native,diffusers) are each timed, in order"
    bench.set_defaults(handler=cmd_bench)

    from ditserve.server.cli import register_server_commands

    register_server_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("DITSERVE_DEBUG") == "1"
    # Importing torch, diffusers and transformers makes some 500k objects that live as long as the process. The
    # cyclic collector would walk them at each of its full passes while they are made and once more at exit (about
    # 1.3 s of a 6 s `generate` on two cores): they are made with it paused, then frozen out of its sight. The few
    # thousand cycles the imports leave behind are frozen with them rather than found by a full pass (0.25 s).
    gc.disable()
    try:
        ns = build_parser().parse_args(argv)
        if not debug:
            quiet_libraries()  # imports the libraries
        gc.freeze()
        gc.enable()
        return ns.handler(ns)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"ditserve: {field_to_flag(e.field)}: {e.message}", file=sys.stderr)
        return 2
    except LoaderError as e:
        print(f"ditserve: --model: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditserve: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, details with DITSERVE_DEBUG=1
        if debug:
            raise
        print(f"ditserve: error: {type(e).__name__}: {e} (set DITSERVE_DEBUG=1 for details)", file=sys.stderr)
        return 1
    finally:
        gc.enable()
        gc.freeze()  # the process ends next: its last collection need not walk what the command made


if __name__ == "__main__":
    sys.exit(main())
