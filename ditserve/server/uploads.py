"""Input images: each must be an image we can decode, checked without decoding a decompression bomb. They come as
uploaded files (multipart) or, in JSON, as a data URL or bare base64; this server fetches no URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re

from fastapi import UploadFile

from ditserve.server.schemas import InvalidRequest

_DATA_URL = re.compile(r"^data:([A-Za-z0-9.+/-]*)((?:;[A-Za-z0-9=.+-]*)*?);base64,", re.ASCII)


async def check_image_upload(upload: UploadFile, param: str, max_pixels: int) -> bytes:
    """The uploaded file's bytes, once they decode as an image of at most `max_pixels`."""
    data = await upload.read()
    await asyncio.to_thread(check_image_bytes, data, param, max_pixels)
    return data


def check_image_bytes(data: bytes, param: str, max_pixels: int) -> None:
    """Refuse, naming `param`, bytes that are empty, not an image we decode, or an image over `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequest(param, "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise InvalidRequest(param, f"is {img.width}x{img.height}; the limit is {max_pixels} pixels")
            img.load()
    except InvalidRequest:
        raise
    except UnidentifiedImageError:  # its text names the in-memory file object, which means nothing to a client
        raise InvalidRequest(param, "is not an image this server can read (png, jpeg or webp)") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InvalidRequest(param, f"could not be decoded as an image (png, jpeg or webp): {e}") from None


def image_bytes_from_text(text: str, param: str) -> bytes:
    """The bytes of an image sent as text: a `data:image/...;base64,` URL or bare base64. A URL to fetch is refused
    (the server reaches nothing on a client's word)."""
    stripped = text.strip()
    if stripped.lower().startswith(("http://", "https://", "file:", "ftp:")):
        raise InvalidRequest(
            param, "this server fetches no URLs: send the image as a data URL (data:image/png;base64,...) or upload it"
        )
    match = _DATA_URL.match(stripped)
    if stripped.startswith("data:") and match is None:
        raise InvalidRequest(param, "a data URL must be base64: data:image/png;base64,...")
    if match is not None:
        media = match.group(1).lower()
        if media and not media.startswith("image/"):
            raise InvalidRequest(param, f"a data URL of {media!r} is not an image")
        stripped = stripped[match.end() :]
    try:
        return base64.b64decode("".join(stripped.split()), validate=True)  # line breaks of wrapped base64 go
    except (binascii.Error, ValueError):
        raise InvalidRequest(param, "is not valid base64 (nor a data URL of an image)") from None
