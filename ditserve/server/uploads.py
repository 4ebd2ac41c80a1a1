"""Uploaded files: each must be an image we can decode, checked without decoding a decompression bomb."""

from __future__ import annotations

import asyncio
import io

from fastapi import UploadFile

from ditserve.server.schemas import InvalidRequest


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
