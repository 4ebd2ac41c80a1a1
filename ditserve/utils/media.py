"""Writing images: PNG, JPEG and WebP, chosen by file extension or name."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def image_format(name: str) -> str:
    key = name.lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"unsupported image format {name!r}; use png, jpeg or webp")
    return FORMATS[key]


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    pil_format = image_format(fmt)
    kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    if pil_format == "JPEG" and image.mode == "RGBA":  # JPEG has no alpha (PNG and WebP keep it)
        image = image.convert("RGB")
    image.save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def numbered_paths(output: str | Path, count: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png, ... for several."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def save_images(images: list[Image.Image], output: str | Path) -> list[Path]:
    path = Path(output)
    fmt = image_format(path.suffix or ".png")
    paths = numbered_paths(path, len(images))
    for image, p in zip(images, paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode_image(image, fmt))
    return paths
