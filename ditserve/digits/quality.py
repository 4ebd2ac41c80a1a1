"""The quality gate: does a generated image show the digit that was asked for?

A support-vector classifier is trained, at load time and in a second, on scikit-learn's digits brought through
the same upsample → downsample path as generated images (`data.to_features`). Nothing is shipped or downloaded, and
the split and the model are deterministic, so a score means the same on every machine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ditserve.digits.data import load_digits, to_features, upsample

HELD_OUT_EVERY = 5  # every fifth scan is held out to measure the classifier itself


@dataclass
class DigitScore:
    """Fraction of images classified as the digit asked for, per digit and overall."""

    per_digit: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    overall: float = 0.0
    predicted: list[int] = field(default_factory=list)

    def summary(self) -> str:
        per = " ".join(f"{d}:{acc:.0%}" for d, acc in sorted(self.per_digit.items()))
        return f"{self.overall:.1%} of {sum(self.counts.values())} images ({per})"


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ink, labels = load_digits()
    features = to_features(upsample(ink))
    held = np.arange(len(labels)) % HELD_OUT_EVERY == 0
    return features[~held], labels[~held], features[held], labels[held]


@functools.cache
def classifier():
    """The fitted classifier (cached per process). gamma suits features on the 0–16 scale."""
    from sklearn.svm import SVC

    x_train, y_train, _, _ = _split()
    return SVC(gamma=0.001, C=10.0).fit(x_train, y_train)


def held_out_accuracy() -> float:
    """The classifier's accuracy on real scans it was not trained on."""
    _, _, x_test, y_test = _split()
    return float((classifier().predict(x_test) == y_test).mean())


def classify(images) -> np.ndarray:
    """The digit each image shows, as the classifier sees it."""
    return classifier().predict(to_features(images)).astype(np.int64)


def score_images(images, digits: Sequence[int]) -> DigitScore:
    """Per-digit accuracy of `images` (PIL images or arrays) against the digits they were asked to show."""
    digits = np.asarray(list(digits), dtype=np.int64)
    if len(digits) != len(images):
        raise ValueError(f"{len(images)} images but {len(digits)} digits")
    predicted = classify(images)
    hits = predicted == digits
    per_digit = {int(d): float(hits[digits == d].mean()) for d in np.unique(digits)}
    counts = {int(d): int((digits == d).sum()) for d in np.unique(digits)}
    return DigitScore(per_digit=per_digit, counts=counts, overall=float(hits.mean()), predicted=predicted.tolist())
