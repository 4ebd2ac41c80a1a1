"""How much each DiT caching setting costs in quality, on a model that has learned something.

`python -m ditserve.digits.cache_quality` generates the ten digits over several seeds with the built-in digits
model (or `--model`), uncached and under every setting of `SETTINGS`, and reports per setting: the fraction of block
computations skipped, the digit classifier's accuracy (the fraction classified as the digit asked for), how often
it agrees with the uncached image's class, and the PSNR against the uncached image. A setting passes the gate when
its accuracy stays within 2 points of uncached.

`--video` scores the moving-digits video model (`--model digits-video --video`) with its own gate
(`ditserve.digits.video_quality`): every digit × direction per seed, the digit read off each clip's frames and the
direction off its ink's motion; a setting passes when both stay within 2 points of uncached.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from ditserve.digits.clips import DIRECTIONS, prompt
from ditserve.digits.quality import classify
from ditserve.digits.video_quality import as_float, classify_videos, motion_directions

# (label, cache settings) in table order; the first is the uncached reference.
SETTINGS: list[tuple[str, dict]] = [
    ("uncached", {"method": "none"}),
    ("mask slow", {"method": "mask", "mask": "slow"}),
    ("mask medium", {"method": "mask", "mask": "medium"}),
    ("mask fast", {"method": "mask", "mask": "fast"}),
    ("mask ultra", {"method": "mask", "mask": "ultra"}),
    ("mask fast, F1", {"method": "mask", "mask": "fast", "fn": 1}),
    ("dbcache F1B0 0.05", {"method": "dbcache", "threshold": 0.05}),
    ("dbcache F1B0 0.08 (default)", {"method": "dbcache"}),
    ("dbcache F1B0 0.12", {"method": "dbcache", "threshold": 0.12}),
    ("dbcache F1B0 0.2", {"method": "dbcache", "threshold": 0.2}),
    ("dbcache F1B1 0.12", {"method": "dbcache", "threshold": 0.12, "bn": 1}),
    ("taylorseer o1 0.08 (default)", {"method": "taylorseer"}),
    ("taylorseer o1 0.12", {"method": "taylorseer", "threshold": 0.12}),
    ("taylorseer o1 0.2", {"method": "taylorseer", "threshold": 0.2}),
    ("taylorseer o2 0.12", {"method": "taylorseer", "threshold": 0.12, "taylorseer_order": 2}),
    ("teacache 0.1", {"method": "teacache", "threshold": 0.1}),
    ("teacache 0.2", {"method": "teacache", "threshold": 0.2}),
    ("teacache 0.3 (default)", {"method": "teacache"}),
    ("teacache 0.5", {"method": "teacache", "threshold": 0.5}),
    ("teacache 1.0", {"method": "teacache", "threshold": 1.0}),
    ("teacache 0.3, unfitted", {"method": "teacache", "teacache_coefficients": [1.0, 0.0]}),
    ("dbcache F1B0 0.4", {"method": "dbcache", "threshold": 0.4}),
    ("mask, 5 of 20 steps", {"method": "mask", "compute_steps": [0, 1, 5, 10, 19]}),
]
GATE_POINTS = 2.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images (or clips) in [0, 1]; identical ones count as 100 dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(1.0 / mse))


def _image_batch(engine, seed: int, cache: dict, request: dict):
    """The ten digits once: (result, outputs, digits asked, None)."""
    digits = list(range(10))
    result = engine.generate([f"the digit {d}" for d in digits], seed=seed, output_type="np", cache=cache, **request)
    return result, [as_float(i) for i in result.images], digits, None


def _video_batch(engine, seed: int, cache: dict, request: dict):
    """Every digit × direction once: (result, clips, digits asked, directions asked)."""
    pairs = [(d, direction) for d in range(10) for direction in DIRECTIONS]
    result = engine.generate([prompt(d, direction) for d, direction in pairs], seed=seed, cache=cache, **request)
    return result, [as_float(v) for v in result.videos], [d for d, _ in pairs], [r for _, r in pairs]


def evaluate(engine, settings: list[tuple[str, dict]], seeds: list[int], video: bool = False, **request) -> list[dict]:
    """One row per setting: skipped fraction, accuracy (and, for video, direction accuracy), agreement with
    uncached, PSNR to uncached, time."""
    batch = _video_batch if video else _image_batch
    reference: dict[int, list[np.ndarray]] = {}
    rows = []
    for label, cache in settings:
        outputs, asked, asked_directions, skipped, seconds = [], [], [], 0.0, 0.0
        for seed in seeds:
            t0 = time.perf_counter()
            result, got, digits, directions = batch(engine, seed, cache, request)
            seconds += time.perf_counter() - t0
            if cache.get("method") == "none":
                reference[seed] = got
            outputs.append((seed, got))
            asked += digits
            asked_directions += directions or []
            skipped += result.timings.get("cache", {}).get("sample_skipped_fraction", 0.0)
        flat = [o for _, got in outputs for o in got]
        ref_flat = [o for seed in seeds for o in reference[seed]]
        if video:
            classes, ref_classes = classify_videos(flat), classify_videos(ref_flat)
        else:
            classes = classify([(o * 255).round().astype(np.uint8) for o in flat])
            ref_classes = classify([(o * 255).round().astype(np.uint8) for o in ref_flat])
        psnrs = [psnr(o, r) for (seed, got) in outputs for o, r in zip(got, reference[seed])]
        row = dict(
            setting=label,
            cache=cache,
            skipped_fraction=skipped / len(seeds) if seeds else 0.0,
            accuracy=float((np.asarray(classes) == np.asarray(asked)).mean()),
            agreement=float((np.asarray(classes) == np.asarray(ref_classes)).mean()),
            psnr_db=float(np.mean(psnrs)),
            seconds=seconds,
        )
        if video:
            row["direction_accuracy"] = float(
                np.mean([a == b for a, b in zip(motion_directions(flat), asked_directions)])
            )
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["passes"] = all(
            (base[key] - row[key]) * 100 <= GATE_POINTS for key in ("accuracy", "direction_accuracy") if key in row
        )
    return rows


def markdown(rows: list[dict]) -> str:
    video = any("direction_accuracy" in r for r in rows)
    accuracy = "digit right | direction right" if video else "accuracy"
    lines = [
        f"| setting | cache settings | block computations skipped | {accuracy} | agrees with uncached "
        "| PSNR to uncached | within 2 points |",
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if video else ""),
    ]
    for r in rows:
        settings = json.dumps(r["cache"], separators=(", ", ": "))
        psnr_text = "identical" if r["psnr_db"] >= 100 else f"{r['psnr_db']:.1f} dB"
        scores = f"{r['accuracy']:.1%}" + (f" | {r['direction_accuracy']:.1%}" if video else "")
        lines.append(
            f"| {r['setting']} | `{settings}` | {r['skipped_fraction']:.0%} | {scores} | "
            f"{r['agreement']:.1%} | {psnr_text} | {'yes' if r['passes'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ditserve import Engine

    p = argparse.ArgumentParser(prog="python -m ditserve.digits.cache_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the built-in digits model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, each for the ten digits")
    p.add_argument(
        "--video", action="store_true", help="the digits-video model: its digit × direction grid and video gate"
    )
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--only", action="append", default=None, help="only settings whose label starts with this")
    p.add_argument("--json", default=None, help="write the rows here too")
    ns = p.parse_args(argv)
    engine = Engine.from_pretrained(ns.model, device=ns.device, dtype=ns.dtype)
    settings = [SETTINGS[0]] + [s for s in SETTINGS[1:] if not ns.only or s[0].startswith(tuple(ns.only))]
    request = {"num_frames": ns.num_frames} if ns.num_frames else {}
    t0 = time.perf_counter()
    rows = evaluate(engine, settings, list(range(ns.seeds)), ns.video, **request)
    print(markdown(rows))
    kind = f"{40 * ns.seeds} clips" if ns.video else f"{10 * ns.seeds} images"
    print(f"\n{engine.model_name}, {kind} a setting, {time.perf_counter() - t0:.0f} s in all")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
