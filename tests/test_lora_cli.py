"""`ditserve generate --lora-path/--lora-nickname/--lora-scale`, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lora_writers import write_ai_toolkit, write_kohya
from PIL import Image
from safetensors.torch import save_file

ARGS = ["--prompt", "x", "--seed", "1", "--height", "32", "--width", "32", "--num-inference-steps", "2"]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ditserve", *args], capture_output=True, text=True, env=dict(os.environ), timeout=timeout
    )


def test_two_loras_match_the_api(tiny_dev, tmp_path):
    a = write_ai_toolkit(tiny_dev, tmp_path / "a.safetensors", seed=31)
    k = write_kohya(tiny_dev, tmp_path / "k.safetensors", seed=32)
    out = tmp_path / "o.png"
    proc = run_cli(
        "generate",
        "--model",
        str(tiny_dev),
        *ARGS,
        "--lora-path",
        str(a),
        "--lora-path",
        str(k),
        "--lora-scale",
        "0.6",
        "--lora-scale",
        "-0.4",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    from ditserve import Engine

    engine = Engine.from_pretrained(str(tiny_dev))
    call = dict(prompt="x", seed=1, height=32, width=32, num_inference_steps=2)
    base = engine.generate(**call).images[0]
    engine.set_lora(["a", "k"], [str(a), str(k)], [0.6, -0.4])
    api = engine.generate(**call).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    assert not np.array_equal(np.asarray(api), np.asarray(base))


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "wan.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-path", "/no/such.safetensors"], "--lora-path: /no/such.safetensors: no such file"),
        (["--lora-path", "{wan}"], "--lora-path: the LoRA (wan) does not fit this model"),
        (["--lora-path", "{wan}", "--lora-scale", "nan"], "--lora-scale: must be a finite number"),
        (["--lora-path", "{wan}", "--lora-scale", "x"], "argument --lora-scale: invalid float value"),
        (["--lora-scale", "0.5"], "give --lora-path for each LoRA"),
        (["--lora-path", "{wan}", "--lora-nickname", "a", "--lora-nickname", "b"], "2 nicknames for 1"),
    ],
)
def test_bad_lora_flags_one_line(flags, message, tiny_dev, tmp_path, wan_file):
    flags = [f.format(wan=wan_file) for f in flags]
    out = tmp_path / "o.png"
    proc = run_cli("generate", "--model", str(tiny_dev), *ARGS, *flags, "--output", str(out))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not out.exists()
