"""The quality gate of the digits-video model: is the digit asked for the one drawn, and does it move the way asked?

- digit: every frame is cropped around its ink's centroid (a CROP × CROP window, paper beyond the frame), brought
  down to 8×8 and classified by a support-vector classifier trained, at first use and in seconds, on frames of real
  clips brought through the same path (`clips.render` → crop → 8×8); the clip's digit is the majority over its
  frames (ties: the smaller digit).
- direction: the ink's centroid from the first frame to the last; the larger of the two displacements and its sign
  name the direction, and a clip whose ink moves less than MIN_TRAVEL pixels moves nowhere ("none", always wrong).

Nothing is shipped or downloaded; the split and the classifier are deterministic, so a score means the same on every
machine.

    python -m ditserve.digits.video_quality [--seeds 3] [--model digits-video] [--examples DIR]

scores every digit × direction × seed and prints the tables of docs/digits-video.md (with --examples, also writes
the first seed's clips there: a PNG strip per direction, frames left to right, a digit per row, and GIFs).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditserve.digits.clips import (
    DIRECTION_VECTORS,
    DIRECTIONS,
    NUM_FRAMES,
    STEP,
    prompt,
    random_motions,
    render_motions,
)
from ditserve.digits.data import load_digits

CROP = 32  # wider than the 24-pixel digit: a centroid off the box's centre must not cut strokes off
INK_THRESHOLD = 0.25  # ink below this (faint background noise) weighs nothing in a centroid
MIN_TRAVEL = STEP * (NUM_FRAMES - 1) / 4  # a quarter of the true clips' 24 pixels
HELD_OUT_EVERY = 5  # every fifth scan is held out to measure the classifier itself
CLASSIFIER_FRAMES = (0, 4, 8)  # frames of each real clip the classifier learns from (the start, middle, end)


def as_float(video) -> np.ndarray:
    """A video's frames (uint8, or float already in [0, 1]) as float32 in [0, 1]."""
    a = np.asarray(video)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def ink_of(videos) -> np.ndarray:
    """Videos (uint8 [T, H, W, 3] arrays such as `utils.video.Video`, float [0, 1] arrays, or clips
    [N, 3, T, H, W] in [-1, 1] as `clips.render` makes them) → ink [N, T, H, W] in [0, 1] (1 - grey)."""
    if isinstance(videos, torch.Tensor):
        return (1 - ((videos.float().mean(1) + 1) / 2).clamp(0, 1)).numpy()
    arrays = [as_float(v) for v in videos]
    return np.stack([1 - (a.mean(-1) if a.ndim == 4 else a) for a in arrays]).clip(0, 1)


def centroids(ink: np.ndarray) -> np.ndarray:
    """Ink [..., H, W] → (y, x) of each frame's ink centroid [..., 2], counting ink above INK_THRESHOLD; a frame
    without such ink gets its centre."""
    h, w = ink.shape[-2:]
    weight = np.where(ink > INK_THRESHOLD, ink, 0.0)
    total = weight.sum(axis=(-2, -1))
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (weight.sum(-1) * ys).sum(-1) / total
        x = (weight.sum(-2) * xs).sum(-1) / total
    y = np.where(total > 0, y, (h - 1) / 2)
    x = np.where(total > 0, x, (w - 1) / 2)
    return np.stack([y, x], axis=-1)


def frame_features(ink: np.ndarray) -> np.ndarray:
    """Frames' ink [N, H, W] → [N, 64]: the CROP × CROP window around each centroid, area-averaged to 8×8, on
    scikit-learn's 0–16 scale."""
    n, h, w = ink.shape
    pad = CROP
    padded = np.zeros((n, h + 2 * pad, w + 2 * pad), dtype=np.float32)
    padded[:, pad : pad + h, pad : pad + w] = ink
    centre = np.rint(centroids(ink)).astype(np.int64)
    crops = np.stack(
        [padded[i, y + pad - CROP // 2 : y + pad + CROP // 2, x + pad - CROP // 2 : x + pad + CROP // 2]
         for i, (y, x) in enumerate(centre)]
    )  # fmt: skip
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(crops)[:, None], (8, 8))[:, 0]
    return (16 * pooled).reshape(n, 64).numpy()


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features of the start, middle and end frames of one seeded random clip of every scan: (train x, y, held-out
    x, y), the held-out scans every HELD_OUT_EVERY-th."""
    ink, labels = load_digits()
    direction, cross = random_motions(len(ink), torch.Generator().manual_seed(0))
    frames = ink_of(render_motions(ink, direction, cross))[:, list(CLASSIFIER_FRAMES)]
    features = frame_features(frames.reshape(-1, *frames.shape[-2:])).reshape(len(ink), len(CLASSIFIER_FRAMES), 64)
    held = np.arange(len(labels)) % HELD_OUT_EVERY == 0
    k = len(CLASSIFIER_FRAMES)
    return (
        features[~held].reshape(-1, 64),
        np.repeat(labels[~held], k),
        features[held].reshape(-1, 64),
        np.repeat(labels[held], k),
    )


@functools.cache
def classifier():
    """The fitted frame classifier (cached per process). gamma suits features on the 0–16 scale."""
    from sklearn.svm import SVC

    x_train, y_train, _, _ = _split()
    return SVC(gamma=0.001, C=10.0).fit(x_train, y_train)


def held_out_accuracy() -> float:
    """The frame classifier's accuracy on frames of scans it was not trained on."""
    _, _, x_test, y_test = _split()
    return float((classifier().predict(x_test) == y_test).mean())


def classify_videos(videos) -> np.ndarray:
    """The digit each video shows: the majority of its frames' classes."""
    ink = ink_of(videos)
    frames = classifier().predict(frame_features(ink.reshape(-1, *ink.shape[-2:]))).reshape(len(ink), -1)
    return np.array([np.bincount(f, minlength=10).argmax() for f in frames], dtype=np.int64)


def motion_directions(videos) -> list[str]:
    """The direction each video's ink moves, first frame to last, or "none" when it moves under MIN_TRAVEL."""
    c = centroids(ink_of(videos))
    out = []
    for dy, dx in c[:, -1] - c[:, 0]:
        if max(abs(dx), abs(dy)) < MIN_TRAVEL:
            out.append("none")
        elif abs(dx) >= abs(dy):
            out.append("right" if dx > 0 else "left")
        else:
            out.append("down" if dy > 0 else "up")
    return out


@dataclass
class VideoScore:
    """Fractions of videos showing the digit asked for and moving the way asked, per digit and per direction."""

    digits: list[int]
    directions: list[str]
    predicted_digits: list[int]
    predicted_directions: list[str]
    digit_accuracy: float = 0.0
    direction_accuracy: float = 0.0
    both_accuracy: float = 0.0  # digit and direction right
    per_digit: dict[int, float] = field(default_factory=dict)  # digit right, per digit asked for
    per_direction: dict[str, float] = field(default_factory=dict)  # direction right, per direction asked for

    def summary(self) -> str:
        digits = " ".join(f"{d}:{a:.0%}" for d, a in sorted(self.per_digit.items()))
        directions = " ".join(f"{d}:{a:.0%}" for d, a in self.per_direction.items())
        return (
            f"{len(self.digits)} videos: digit {self.digit_accuracy:.1%} ({digits}); "
            f"direction {self.direction_accuracy:.1%} ({directions}); both {self.both_accuracy:.1%}"
        )

    def table(self) -> str:
        """Markdown: a row per digit, a column per direction, each cell "digit right · direction right" out of the
        videos asked for that pair."""
        rows = ["| digit | " + " | ".join(DIRECTIONS) + " |", "| --- |" + " --- |" * len(DIRECTIONS)]
        for d in sorted(set(self.digits)):
            cells = []
            for direction in DIRECTIONS:
                pick = [i for i, (a, b) in enumerate(zip(self.digits, self.directions)) if (a, b) == (d, direction)]
                digit_ok = sum(self.predicted_digits[i] == d for i in pick)
                direction_ok = sum(self.predicted_directions[i] == direction for i in pick)
                cells.append(f"{digit_ok}/{len(pick)} · {direction_ok}/{len(pick)}" if pick else "")
            rows.append(f"| {d} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def score_videos(videos, digits: Sequence[int], directions: Sequence[str]) -> VideoScore:
    """Score `videos` (see `ink_of`) against the digits and directions they were asked to show."""
    digits, directions = [int(d) for d in digits], list(directions)
    if not len(videos) == len(digits) == len(directions):
        raise ValueError(f"{len(videos)} videos, {len(digits)} digits and {len(directions)} directions")
    unknown = set(directions) - set(DIRECTION_VECTORS)
    if unknown:
        raise ValueError(f"unknown directions {sorted(unknown)}; known: {', '.join(DIRECTIONS)}")
    got_digits = classify_videos(videos).tolist()
    got_directions = motion_directions(videos)
    digit_ok = np.array([a == b for a, b in zip(got_digits, digits)])
    direction_ok = np.array([a == b for a, b in zip(got_directions, directions)])
    d_arr, dir_arr = np.array(digits), np.array(directions)
    return VideoScore(
        digits=digits,
        directions=directions,
        predicted_digits=got_digits,
        predicted_directions=got_directions,
        digit_accuracy=float(digit_ok.mean()),
        direction_accuracy=float(direction_ok.mean()),
        both_accuracy=float((digit_ok & direction_ok).mean()),
        per_digit={int(d): float(digit_ok[d_arr == d].mean()) for d in np.unique(d_arr)},
        per_direction={d: float(direction_ok[dir_arr == d].mean()) for d in DIRECTIONS if (dir_arr == d).any()},
    )


def generate_grid(engine, seeds: Iterable[int], form: int = 0, **overrides) -> tuple[list, list[int], list[str]]:
    """Every digit × direction once per seed (one batch of 40 prompts per seed), at the model's defaults unless
    `overrides` (Engine.generate's keywords) say otherwise: (videos, digits, directions)."""
    pairs = [(d, direction) for d in range(10) for direction in DIRECTIONS]
    videos, digits, directions = [], [], []
    for seed in seeds:
        result = engine.generate([prompt(d, direction, form) for d, direction in pairs], seed=seed, **overrides)
        videos += result.videos
        digits += [d for d, _ in pairs]
        directions += [direction for _, direction in pairs]
    return videos, digits, directions


def save_examples(videos, digits: Sequence[int], directions: Sequence[str], folder, scale: int = 2) -> list:
    """One PNG strip per direction (a row per video, its frames left to right, `scale`× larger) and a GIF of each
    video; returns the paths written."""
    from PIL import Image

    from ditserve.utils.video import Video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for direction in DIRECTIONS:
        rows = [np.concatenate(list(np.asarray(v)), axis=1) for v, d in zip(videos, directions) if d == direction]
        if not rows:
            continue
        strip = Image.fromarray(np.concatenate(rows, axis=0))
        strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
        written.append(folder / f"digits-video-{direction}.png")
        strip.save(written[-1])
    for v, d, direction in zip(videos, digits, directions):
        frames = np.asarray(v).repeat(scale, axis=1).repeat(scale, axis=2)
        written.append(Video(frames, fps=getattr(v, "fps", 8)).save(folder / f"digit-{d}-{direction}.gif"))
    return written


def main(argv: list[str] | None = None) -> int:
    from ditserve import Engine

    p = argparse.ArgumentParser(prog="python -m ditserve.digits.video_quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-video")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every digit × direction")
    p.add_argument("--form", type=int, default=0, help="prompt form (0: 'the digit 3 moving left')")
    p.add_argument("--guidance-scale", type=float, default=None, help="in place of the model's default")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps in place of the model's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    # The lossy settings a feature is scored in (its digit and direction accuracy beside the lossless run's).
    p.add_argument("--attention", default=None, help="attention backend of the requests (fp8, sliding-tile, ...)")
    p.add_argument("--quantization", default=None, help="the engine's --quantization (fp8)")
    p.add_argument("--examples", default=None, help="folder to write the first seed's clips to (PNG strips, GIFs)")
    p.add_argument("--json", default=None, help="write the settings and scores here too")
    ns = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine.from_pretrained(ns.model, device=ns.device, dtype=ns.dtype, quantization=ns.quantization)
    overrides = {"guidance_scale": ns.guidance_scale, "num_inference_steps": ns.steps, "attention": ns.attention}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    videos, digits, directions = generate_grid(engine, range(ns.seeds), ns.form, **overrides)
    score = score_videos(videos, digits, directions)
    print(f"frame classifier, held-out frames: {held_out_accuracy():.1%}")
    print(score.summary())
    print(score.table())
    if ns.json:
        settings = dict(model=ns.model, seeds=ns.seeds, form=ns.form, dtype=ns.dtype, quantization=ns.quantization)
        fields = ("digit_accuracy", "direction_accuracy", "both_accuracy", "per_digit", "per_direction")
        report = {"settings": settings | overrides} | {k: getattr(score, k) for k in fields}
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")
    if ns.examples:
        first = slice(0, 10 * len(DIRECTIONS))
        for path in save_examples(videos[first], digits[first], directions[first], ns.examples):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
