"""The issue's quality gate for speed features on CUDA: the built-in digits model's classifier accuracy."""

from __future__ import annotations

from ditserve import Engine
from ditserve.digits.data import prompt
from ditserve.digits.quality import score_images


def cuda_digit_accuracy(**engine_args) -> float:
    """Accuracy of the digits model in bf16 on CUDA with `engine_args` (e.g. quantization="fp8") over ten digits ×
    both prompt forms × three seeds (60 images)."""
    with Engine.from_pretrained(None, device="cuda", dtype="bfloat16", **engine_args) as engine:
        images, asked = [], []
        for form in (0, 1):
            for seed in (0, 1, 2):
                images += engine.generate([prompt(d, form) for d in range(10)], seed=seed + 1000 * form).images
                asked += list(range(10))
    return score_images(images, asked).overall
