"""Video results written and read back: MP4 (H.264 through PyAV), GIF and WebP animations, a folder of PNG frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditserve.utils.video import Video, decode_video, is_video_path


def moving_square(frames: int = 9, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    h, w = size
    clip = np.zeros((frames, h, w, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, 12:36, 4 + 4 * t : 20 + 4 * t] = (230, 40, 40)
    return clip


def test_mp4_round_trip_keeps_count_size_rate_and_content(tmp_path):
    clip = Video(moving_square(), fps=12)
    path = clip.save(tmp_path / "clip.mp4")
    frames, fps = decode_video(path.read_bytes())
    assert frames.shape == clip.shape and fps == pytest.approx(12)
    # Lossy, but the picture is the picture: the square sits where it was drawn, frame by frame.
    assert np.abs(frames.astype(int) - clip.astype(int)).mean() < 4
    assert frames[8, 24, 40, 0] > 150 and frames[0, 24, 40, 0] < 60


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animations_hold_every_frame(tmp_path, suffix):
    clip = Video(moving_square(5), fps=10)
    with Image.open(clip.save(tmp_path / f"clip{suffix}")) as image:
        assert image.n_frames == 5 and image.size == (64, 48)


def test_folder_of_png_frames(tmp_path):
    clip = Video(moving_square(3))
    folder = clip.save(tmp_path / "frames/")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["frame-0000.png", "frame-0001.png", "frame-0002.png"]
    assert np.array_equal(np.asarray(Image.open(folder / names[2])), clip[2])


def test_video_is_an_array_and_refuses_other_shapes(tmp_path):
    clip = Video(moving_square(3), fps=8)
    assert isinstance(clip, np.ndarray) and clip.fps == 8 and clip[1:].fps == 8
    with pytest.raises(ValueError, match="uint8"):
        Video(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="even sides"):
        Video(np.zeros((2, 7, 8, 3), dtype=np.uint8)).save(tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="unsupported video format"):
        clip.save(tmp_path / "clip.avi")
    assert is_video_path("a.mp4") and is_video_path("frames/") and not is_video_path("a.png")
