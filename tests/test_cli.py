"""The CLI end to end, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run_cli(*args, cache=None, timeout=300):
    env = dict(os.environ)
    if cache is not None:
        env["DITSERVE_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "ditserve", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_generate_default_model_writes_image(tmp_path):
    out = tmp_path / "digit.png"
    proc = run_cli(
        "generate",
        "--prompt",
        "the digit 3",
        "--seed",
        "3",
        "--num-inference-steps",
        "3",
        "--output",
        str(out),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (32, 32)  # the built-in digits model's own default size
    summary = proc.stdout.strip().splitlines()[-1]
    for part in ("1 image(s) in", "encode", "denoise", "decode", "s/step", "peak memory", "seed 3", str(out)):
        assert part in summary
    assert "Traceback" not in proc.stderr


def test_generate_folder_several_images_jpeg_matches_api(tiny_dev, tmp_path):
    out = tmp_path / "img.jpg"
    proc = run_cli(
        "generate",
        "--model",
        str(tiny_dev),
        "--prompt",
        "x",
        "--num-images",
        "2",
        "--seed",
        "1",
        "--height",
        "32",
        "--width",
        "48",
        "--num-inference-steps",
        "2",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("img-*.jpg"))
    assert [f.name for f in files] == ["img-0.jpg", "img-1.jpg"]
    assert Image.open(files[0]).format == "JPEG" and Image.open(files[0]).size == (48, 32)

    png = tmp_path / "same.png"
    assert (
        run_cli(
            "generate",
            "--model",
            str(tiny_dev),
            "--prompt",
            "x",
            "--seed",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--num-inference-steps",
            "2",
            "--output",
            str(png),
        ).returncode
        == 0
    )
    from ditserve import Engine

    api = Engine.from_pretrained(str(tiny_dev)).generate("x", seed=1, height=32, width=48, num_inference_steps=2)
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(api.images[0]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "30"], "--height: must be a multiple of 4"),
        (["--num-inference-steps", "0"], "--num-inference-steps: must be an integer from 1"),
        (["--num-images", "99"], "--num-images: must be an integer from 1 to 16"),
        (["--model", "/no/such/model"], "--model: model '/no/such/model': no such folder"),
        (["--model", "flux.1-dev"], "--load-format dummy"),
        (["--output", "x.avi"], "--output: 'x.avi': use .png, .jpg or .webp for images"),
        (["--output", "x.gif"], "--output: this model makes images: use .png, .jpg or .webp, not 'x.gif'"),
        (["--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
        (["--device", "tpu"], "--device:"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--height", "abc"], "argument --height: invalid int value: 'abc'"),
    ],
)
def test_bad_flags_one_line_no_traceback(args, message, tmp_path):
    proc = run_cli(
        "generate",
        "--prompt",
        "x",
        "--num-inference-steps",
        "1",
        "--output",
        str(tmp_path / "o.png"),
        *args,
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_missing_prompt_is_one_line():
    proc = run_cli("generate")
    assert proc.returncode == 2
    assert "--prompt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_make_tiny_folder_loads_in_diffusers(tmp_path):
    proc = run_cli("make-tiny", "flux", str(tmp_path / "t"), "--schnell", "--sharded")
    assert proc.returncode == 0, proc.stderr
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tmp_path / "t")
    assert pipe.transformer.config.guidance_embeds is False
    assert list((tmp_path / "t" / "transformer").glob("*.index.json"))


def test_make_tiny_unknown_family(tmp_path):
    proc = run_cli("make-tiny", "sd15", str(tmp_path / "t"))
    assert proc.returncode == 2 and "unknown family" in proc.stderr


def test_import_and_help_load_no_model_stack():
    """`import ditserve` and building every command's parser (what --help does) import neither torch nor the
    libraries of the model stack or the server: the HTTP process and --help need none of them."""
    code = (
        "import sys, ditserve, ditserve.cli; ditserve.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    proc = run_cli("serve", "--help", timeout=60)
    assert proc.returncode == 0 and "--lora-dir" in proc.stdout


def test_public_names_load_on_first_use():
    import ditserve
    from ditserve.config import SamplingParams
    from ditserve.errors import LoaderError

    assert ditserve.SamplingParams is SamplingParams and ditserve.LoaderError is LoaderError
    assert set(ditserve.__all__) <= set(dir(ditserve))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ditserve.Nope  # noqa: B018


def test_main_turns_the_collector_back_on():
    """main pauses the cyclic collector while the libraries are imported; it must be running again afterwards,
    whether the command succeeded or failed."""
    import gc

    from ditserve.cli import main

    try:
        assert main(["generate", "--prompt", "x", "--bogus"]) == 2
        assert gc.isenabled()
    finally:
        gc.unfreeze()  # main froze this test process's objects, as a command's last step does


def test_generate_video_writes_mp4_and_refuses_image_outputs(tiny_wan, tmp_path):
    """A video model through the CLI: --num-frames and --fps reach the MP4 (decoded back: frame count, size, rate);
    an image file name for a video model is refused before any work, naming --output."""
    from ditserve.utils.video import decode_video

    out = tmp_path / "clip.mp4"
    args = ["--model", str(tiny_wan), "--prompt", "a fox", "--height", "32", "--width", "48", "--seed", "1"]
    proc = run_cli(
        "generate", *args, "--num-frames", "5", "--fps", "8", "--num-inference-steps", "2", "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 video(s)" in proc.stdout
    frames, fps = decode_video(out.read_bytes())
    assert frames.shape == (5, 32, 48, 3) and fps == 8
    refused = run_cli("generate", *args, "--output", str(tmp_path / "clip.png"))
    assert refused.returncode == 2 and "--output" in refused.stderr and "makes videos" in refused.stderr


def test_option_flags_parse_and_errors_name_them():
    from ditserve.cli import UsageError, parse_options
    from ditserve.cli_common import field_to_flag

    assert parse_options(["sampler=euler", "flow_shift=5", "denoising_steps=1000,750", "x=null"]) == {
        "sampler": "euler",
        "flow_shift": 5,
        "denoising_steps": "1000,750",
        "x": None,
    }
    assert parse_options(None) is None
    with pytest.raises(UsageError, match="--option: 'sampler' is not NAME=VALUE"):
        parse_options(["sampler"])
    assert field_to_flag("options.flow_shift") == "--option flow_shift"
    assert field_to_flag("sampling_preset") == "--sampling-preset"
    assert field_to_flag("images") == "--image"
