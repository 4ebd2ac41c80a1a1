"""Moving-digit clips made from scikit-learn's handwritten digits: what the built-in `digits-video` model learns.

Each clip is NUM_FRAMES frames of CLIP_SIZE × CLIP_SIZE pixels, dark ink on white: one scan upsampled to
DIGIT_SIZE × DIGIT_SIZE (as `data.upsample` does) crossing the frame left, right, up or down by STEP pixels a frame,
from one edge to the other, at a random place across the motion. The prompt names the digit and the direction
("the digit 3 moving left"). Frames are what the Wan VAE takes: [3, T, H, W] in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from ditserve.digits.data import upsample

CLIP_SIZE = 48
NUM_FRAMES = 9  # Wan's VAE takes 4k + 1 frames: the first alone, then 4 to a latent frame
DIGIT_SIZE = 24  # each 8×8 scan pixel becomes 3×3
STEP = (CLIP_SIZE - DIGIT_SIZE) // (NUM_FRAMES - 1)  # 3 pixels a frame: edge to edge over the clip
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion of each direction in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPT_FORMS = ("the digit {} moving {}", "a handwritten digit {} moving {}")
CROSS_JITTER = 6  # pixels the digit may sit off-centre across its motion, either way


def prompt(digit: int, direction: str, form: int = 0) -> str:
    if direction not in DIRECTION_VECTORS:
        raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
    return PROMPT_FORMS[form].format(digit, direction)


def positions(direction: str, cross: int) -> list[tuple[int, int]]:
    """(top, left) of the digit's box in each frame: edge to edge along the motion, `cross` pixels off-centre
    across it."""
    dx, dy = DIRECTION_VECTORS[direction]
    travel = STEP * (NUM_FRAMES - 1)
    middle = (CLIP_SIZE - DIGIT_SIZE) // 2
    out = []
    for f in range(NUM_FRAMES):
        along = f * STEP
        x = (along if dx > 0 else travel - along) if dx else middle + cross
        y = (along if dy > 0 else travel - along) if dy else middle + cross
        out.append((y, x))
    return out


def render(ink: np.ndarray, directions: list[str], cross: np.ndarray | list[int]) -> torch.Tensor:
    """Scans [N, 8, 8] in [0, 1], a direction and a cross offset each → clips [N, 3, NUM_FRAMES, H, W] in [-1, 1]."""
    digits = upsample(ink, DIGIT_SIZE)[:, 0]  # [N, S, S] in [-1, 1]: white paper is 1
    clips = torch.ones(len(ink), NUM_FRAMES, CLIP_SIZE, CLIP_SIZE)
    for i, (direction, c) in enumerate(zip(directions, cross)):
        for f, (y, x) in enumerate(positions(direction, int(c))):
            clips[i, f, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = digits[i]
    return clips[:, None].expand(-1, 3, -1, -1, -1).contiguous()


def random_motions(n: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random (direction index into DIRECTIONS, cross offset) pairs."""
    direction = torch.randint(len(DIRECTIONS), (n,), generator=gen).numpy()
    cross = torch.randint(-CROSS_JITTER, CROSS_JITTER + 1, (n,), generator=gen).numpy()
    return direction, cross


def render_motions(ink: np.ndarray, direction: np.ndarray, cross: np.ndarray) -> torch.Tensor:
    """`render` with directions given as indices into DIRECTIONS."""
    return render(ink, [DIRECTIONS[d] for d in direction], cross)
