"""Video results: frames as a uint8 array T×H×W×3 that can save itself, and the writers behind it.

`.mp4` is H.264 through PyAV (its wheels carry FFmpeg: no system ffmpeg needed), yuv420p so every player takes it;
`.gif` and `.webp` are animations through Pillow; a path with no suffix (or ending in `/`) becomes a folder of PNG
frames, `frame-0000.png`, ...
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")


class Video(np.ndarray):
    """A clip: a uint8 array [frames, height, width, 3] with its frame rate. Slicing and arithmetic give plain
    arrays' behaviour; `save` writes it."""

    fps: int

    def __new__(cls, frames, fps: int = 16) -> Video:
        array = np.asarray(frames)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"a video is uint8 [frames, height, width, 3], got {array.dtype} {array.shape}")
        video = array.view(cls)
        video.fps = int(fps)
        return video

    def __array_finalize__(self, obj) -> None:
        self.fps = getattr(obj, "fps", 16)

    def save(self, path: str | Path, fps: int | None = None, quality: int = 23) -> Path:
        """Write to `path` (.mp4, .gif, .webp, or a folder of PNGs); `quality` is H.264's CRF (lower: better)."""
        return save_video(np.asarray(self), path, fps or self.fps, quality)


def is_video_path(path: str | Path) -> bool:
    text = str(path)
    return text.endswith(("/", "\\")) or Path(text).suffix.lower() in (*VIDEO_SUFFIXES, "")


def encode_mp4(frames: np.ndarray, fps: int, quality: int = 23) -> bytes:
    """H.264 MP4 bytes of uint8 frames [T, H, W, 3] (even sides: yuv420p halves the chroma)."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"MP4 (H.264, yuv420p) needs even sides, got {w}x{h}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(quality)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_video(data: bytes) -> tuple[np.ndarray, float]:
    """(frames uint8 [T, H, W, 3], frames per second) of an encoded video."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), rate


def encode_animation(frames: np.ndarray, fps: int, fmt: str) -> bytes:
    """An animated GIF or WebP of the frames, looping."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    duration = max(1, round(1000 / fps))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:], duration=duration, loop=0, **kwargs)
    return buffer.getvalue()


def save_video(frames: np.ndarray, path: str | Path, fps: int, quality: int = 23) -> Path:
    """Write frames [T, H, W, 3] uint8 by the path's suffix; returns the path written."""
    text = str(path)
    target = Path(text)
    suffix = target.suffix.lower()
    if text.endswith(("/", "\\")) or suffix == "":
        target.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(target / f"frame-{i:04d}.png")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        target.write_bytes(encode_mp4(frames, fps, quality))
    elif suffix in (".gif", ".webp"):
        target.write_bytes(encode_animation(frames, fps, suffix[1:].upper()))
    else:
        raise ValueError(f"unsupported video format {suffix!r}; use .mp4, .gif, .webp or a folder for PNG frames")
    return target
