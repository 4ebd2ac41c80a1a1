"""scikit-learn's bundled handwritten digits (1,797 scans of 8×8, values 0–16) as images and prompts.

Images are dark ink on white, upsampled to IMAGE_SIZE: what the model is trained on and what it generates. The
classifier of `quality` sees them brought back to 8×8 by `to_features`, so real and generated images meet it the
same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
PROMPT_FORMS = ("the digit {}", "a handwritten digit {}")


def prompt(digit: int, form: int = 0) -> str:
    return PROMPT_FORMS[form].format(digit)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(ink [N, 8, 8] in [0, 1], labels [N]) in scikit-learn's order (no download: the data ships with it)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def upsample(ink: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """ink [N, 8, 8] → RGB images [N, 3, size, size] in [-1, 1] (the VAE's range), white paper, dark ink."""
    x = torch.from_numpy(ink)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (1 - 2 * x).expand(-1, 3, -1, -1).contiguous()


def to_features(images) -> np.ndarray:
    """Images (PIL, uint8 or float [0, 1] arrays [H, W, 3], or a tensor [N, 3, H, W] in [-1, 1]) → [N, 64] ink
    on scikit-learn's 0–16 scale, by area-averaging down to 8×8."""
    if isinstance(images, torch.Tensor):
        gray = ((images.float().mean(1) + 1) / 2).clamp(0, 1)
    else:
        arrays = []
        for im in images:
            a = np.asarray(im)
            a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
            arrays.append(a.mean(-1) if a.ndim == 3 else a)
        gray = torch.from_numpy(np.stack(arrays))
    ink = F.adaptive_avg_pool2d((1 - gray)[:, None], (8, 8))[:, 0]
    return (16 * ink).reshape(len(ink), 64).numpy()
