"""Input images of edit and image-to-video requests, in the one form pipelines keep them in.

A request may give PIL images, H×W×3 (or ×4) uint8 arrays, file paths or PNG/JPEG data URIs. `resolve` turns each
into a PNG data URI (`as_data_uri`): lossless plain data, so a resolved request can be compared, batched, sent to
another rank or process and logged; the run reads it back with `load_image`.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch

from ditserve.config import ConfigError

PNG_DATA_URI = "data:image/png;base64,"


def load_image(image, mode: str = "RGB"):
    """An input image as a PIL image in `mode` (RGB, or RGBA where the model reads alpha); a bad one is a
    ConfigError naming `images`."""
    from PIL import Image

    if isinstance(image, str) and image.startswith("data:image/"):
        image = io.BytesIO(base64.b64decode(image.split(",", 1)[1]))
    if isinstance(image, str | os.PathLike | io.BytesIO):
        try:
            with Image.open(image) as opened:
                return opened.convert(mode)
        except OSError as e:
            raise ConfigError("images", f"cannot read image {str(image)[:80]!r} ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert(mode)
    array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise ConfigError("images", f"an array image must be H×W×3 (or ×4) uint8, got {array.shape} {array.dtype}")
    return Image.fromarray(array).convert(mode)


def image_data_uri(image) -> str:
    """A PIL image as a PNG data URI (RGBA keeps its alpha)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PNG_DATA_URI + base64.b64encode(buffer.getvalue()).decode()


def as_data_uri(image, mode: str = "RGB") -> str:
    """Any input image as a PNG data URI of its pixels in `mode` (one that is such a URI already stays as it is)."""
    if isinstance(image, str) and image.startswith(PNG_DATA_URI):
        return image
    return image_data_uri(load_image(image, mode))
