"""Uploaded files: each must be an image we can decode, checked without decoding a decompression bomb."""

from __future__ import annotations

import asyncio
import io

from fastapi import UploadFile

from ditserve.server.schemas import InvalidRequest


async def check_image_upload(upload: UploadFile, param: str, max_pixels: int) -> None:
    from PIL import Image, UnidentifiedImageError

    data = await upload.read()
    if not data:
        raise InvalidRequest(param, "the uploaded file is empty")

    def check() -> None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise InvalidRequest(param, f"is {img.width}x{img.height}; the limit is {max_pixels} pixels")
                img.load()
        except InvalidRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise InvalidRequest(param, f"could not be decoded as an image (png, jpeg or webp): {e}") from None

    await asyncio.to_thread(check)
