"""The built-in digits models, trained on scikit-learn's handwritten digits, and their quality gates.

- `digits`: a tiny FLUX.1 drawing the digit asked for.
  `data`: the labelled images (8×8 scans upsampled) and the prompts; `quality`: a classifier trained from the same
  data that scores generated images per digit; `train`: trains the VAE and the DiT and writes
  `ditserve/assets/digits-flux`.
- `digits-video`: a tiny Wan2.1 text-to-video model of a digit crossing the frame the way asked.
  `clips`: the moving-digit clips and their prompts; `video_quality`: scores generated videos by digit (a frame
  classifier, majority over frames) and direction (the ink's centroid, first frame to last); `train_video`: trains
  the Wan VAE and the DiT and writes `ditserve/assets/digits-video`.
"""

from __future__ import annotations

from pathlib import Path

# Package data (pyproject.toml), so wheels and editable installs both carry them.
MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-flux"
VIDEO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-video"


def _shipped(folder: Path, name: str, command: str) -> Path:
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder}: the {name} model is missing from this install; write it with `{command} --out {folder}`"
        )
    return folder


def model_path() -> Path:
    """The shipped folder of the built-in `digits` model."""
    return _shipped(MODEL_DIR, "digits", "python -m ditserve.digits.train")


def video_model_path() -> Path:
    """The shipped folder of the built-in `digits-video` model."""
    return _shipped(VIDEO_MODEL_DIR, "digits-video", "python -m ditserve.digits.train_video")
