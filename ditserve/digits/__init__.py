"""The built-in digits model: a tiny FLUX.1 trained on scikit-learn's handwritten digits, and its quality gate.

- `data`: the labelled images (8×8 scans upsampled) and the prompts the model answers to.
- `quality`: a classifier trained from the same data that scores generated images per digit.
- `train`: trains the VAE and the DiT and writes the diffusers folder shipped in `ditserve/assets/digits-flux`.
"""

from __future__ import annotations

from pathlib import Path

# Package data (pyproject.toml), so wheels and editable installs both carry it.
MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-flux"


def model_path() -> Path:
    """The shipped folder of the built-in `digits` model."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{MODEL_DIR}: the digits model is missing from this install; "
            "write it with `python -m ditserve.digits.train --out ditserve/assets/digits-flux`"
        )
    return MODEL_DIR
