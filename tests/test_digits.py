"""The built-in digits model: it is the default, it draws the digit asked for, and diffusers draws the same."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ditserve import Engine
from ditserve.digits import model_path
from ditserve.digits.data import PROMPT_FORMS, load_digits, prompt, upsample
from ditserve.digits.quality import classify, held_out_accuracy, score_images
from ditserve.loader.folder import resolve_model

SEEDS = (0, 1, 2, 3, 4)  # per prompt form: 10 images per digit


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(None, device="cpu", dtype="float32")


def generate_all(engine: Engine, seeds=SEEDS) -> tuple[list, list[int]]:
    """Every digit in both prompt forms at the model's defaults, one batch of 10 per seed and form.

    The second form gets other seeds: with the same noise both forms draw nearly the same picture, which would
    count one sample twice.
    """
    images, asked = [], []
    for form in range(len(PROMPT_FORMS)):
        for seed in seeds:
            images += engine.generate([prompt(d, form) for d in range(10)], seed=seed + 1000 * form).images
            asked += list(range(10))
    return images, asked


def test_default_model_is_the_shipped_digits_folder():
    source = resolve_model(None)
    assert source.name == "digits" and source.folder == model_path()
    assert resolve_model("tiny-flux").name == "tiny-flux"  # still built in
    total = sum(f.stat().st_size for f in model_path().rglob("*") if f.is_file())
    assert total <= 10 * 2**20, f"shipped folder is {total / 2**20:.1f} MiB"
    defaults = json.loads((model_path() / "ditserve.json").read_text())["sampling_defaults"]
    assert defaults["height"] == defaults["width"] == 32
    assert defaults["negative_prompt"] == "" and defaults["true_cfg_scale"] > 1  # sampled with true CFG


def test_classifier_is_accurate_on_held_out_scans():
    assert held_out_accuracy() >= 0.95


def test_score_images_counts_per_digit():
    ink, labels = load_digits()
    real = [((im.permute(1, 2, 0).numpy() + 1) / 2) for im in upsample(ink[:200])]
    score = score_images(real, labels[:200])
    assert score.overall >= 0.95 and set(score.per_digit) == set(range(10))
    wrong = score_images(real, (labels[:200] + 1) % 10)  # every label off by one: nearly nothing is right
    assert wrong.overall <= 0.1
    with pytest.raises(ValueError):
        score_images(real, labels[:10])


def test_generated_digits_are_the_ones_asked_for(engine):
    images, asked = generate_all(engine)
    assert images[0].size == (32, 32)
    score = score_images(images, asked)
    print(f"digits model, CPU float32, {len(SEEDS)} seeds × {len(PROMPT_FORMS)} prompt forms: {score.summary()}")
    assert score.overall >= 0.9, score.summary()
    assert min(score.per_digit.values()) >= 0.9, score.summary()


def test_prompts_steer_the_image(engine):
    """The same noise with different prompts gives different digits: the text is what decides."""
    images = engine.generate([prompt(d) for d in range(10)], seed=7).images
    assert len(set(classify(images).tolist())) >= 8


def test_matches_diffusers_on_the_shipped_folder(engine, diffusers_pipe):
    """The folder's defaults include true CFG against the empty prompt; diffusers is given them explicitly."""
    p = engine.defaults()
    assert p.true_cfg_scale > 1 and p.negative_prompt == ""
    ours = engine.generate("the digit 7", seed=3)
    pipe = diffusers_pipe(model_path())
    theirs = pipe(
        "the digit 7",
        negative_prompt=p.negative_prompt,
        true_cfg_scale=p.true_cfg_scale,
        height=p.height,
        width=p.width,
        num_inference_steps=p.num_inference_steps,
        max_sequence_length=p.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    a, b = np.asarray(ours.images[0], dtype=np.int16), np.asarray(theirs, dtype=np.int16)
    assert a.std() > 20  # a drawing, not a flat field
    assert np.abs(a - b).mean() <= 1.0
    assert classify([theirs])[0] == classify(ours.images)[0] == 7


@pytest.mark.gpu
def test_generated_digits_bf16_cuda():
    engine = Engine.from_pretrained(None, device="cuda", dtype="bfloat16")
    images, asked = generate_all(engine)
    score = score_images(images, asked)
    print(f"digits model, CUDA bfloat16, {len(SEEDS)} seeds × {len(PROMPT_FORMS)} prompt forms: {score.summary()}")
    assert score.overall >= 0.9, score.summary()
    assert min(score.per_digit.values()) >= 0.9, score.summary()


def test_training_is_seeded_and_writes_a_loadable_folder(tmp_path):
    """Two short runs with one seed write the same weights, in a folder both loaders take; another seed differs."""
    from ditserve.digits.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training command runs
    try:
        cfg = TrainConfig(vae_steps=2, dit_steps=3, batch_size=4, vae_batch_size=4)
        a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
        c = train(TrainConfig(seed=1, vae_steps=2, dit_steps=3, batch_size=4, vae_batch_size=4), tmp_path / "c")
    finally:
        torch.set_num_threads(threads)
    assert "DITSERVE_DISABLE_TRITON" not in os.environ  # training's setting does not leak
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (a / part).read_bytes() == (b / part).read_bytes()
        assert (a / part).read_bytes() != (c / part).read_bytes()
    result = Engine.from_pretrained(str(a), device="cpu").generate("the digit 1", seed=0)
    assert result.images[0].size == (32, 32) and result.params.num_inference_steps == cfg.num_inference_steps
    assert (result.params.true_cfg_scale, result.params.negative_prompt) == (cfg.true_cfg_scale, cfg.negative_prompt)
