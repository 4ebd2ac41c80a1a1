"""The built-in digits-video model: it loads as any Wan folder, draws the digit asked for moving the way asked, and
diffusers' WanPipeline draws the same frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditserve import Engine
from ditserve.digits import video_model_path
from ditserve.digits.clips import DIRECTIONS, NUM_FRAMES, prompt, random_motions, render, render_motions
from ditserve.digits.data import load_digits
from ditserve.digits.video_quality import generate_grid, held_out_accuracy, motion_directions, score_videos
from ditserve.loader.folder import resolve_model

GATE_SEEDS = (0,)  # one batch of every digit × direction: 40 videos


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits-video", device="cpu", dtype="float32")


def test_builtin_name_is_the_shipped_wan_folder():
    source = resolve_model("digits-video")
    assert source.name == "digits-video" and source.folder == video_model_path()
    assert source.spec.family == "wan" and source.model_index()["_class_name"] == "WanPipeline"
    total = sum(f.stat().st_size for f in video_model_path().rglob("*") if f.is_file())
    assert total <= 15 * 2**20, f"shipped folder is {total / 2**20:.1f} MiB"
    defaults = json.loads((video_model_path() / "ditserve.json").read_text())["sampling_defaults"]
    assert defaults["height"] == defaults["width"] == 48 and defaults["num_frames"] == NUM_FRAMES
    assert defaults["negative_prompt"] == "" and defaults["guidance_scale"] > 1  # sampled with CFG


def test_frame_classifier_is_accurate_on_held_out_scans():
    assert held_out_accuracy() >= 0.95


def test_scorer_on_real_clips():
    """Real clips score (nearly) all right; the same clips asked for the opposite way, run backwards, or standing
    still score as such."""
    ink, labels = load_digits()
    direction, cross = random_motions(120, torch.Generator().manual_seed(1))
    clips = render_motions(ink[-120:], direction, cross)
    asked = [DIRECTIONS[d] for d in direction]
    score = score_videos(clips, labels[-120:], asked)
    assert score.digit_accuracy >= 0.95 and score.direction_accuracy == 1.0, score.summary()
    assert set(score.per_direction) == set(DIRECTIONS) and set(score.per_digit) == set(range(10))
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert motion_directions(clips.flip(2)) == [opposite[d] for d in asked]  # time reversed
    still = render(ink[:2], ["left", "up"], [0, 0])[:, :, :1].expand(-1, -1, NUM_FRAMES, -1, -1)
    assert motion_directions(still) == ["none", "none"]
    # uint8 frames [T, H, W, 3] (what the engine returns) score as the tensors do
    frames = [((c.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for c in clips[:20]]
    assert score_videos(frames, labels[-120:-100], asked[:20]).predicted_directions == score.predicted_directions[:20]
    with pytest.raises(ValueError, match="directions"):
        score_videos(clips[:2], [1, 2], ["left", "sideways"])
    with pytest.raises(ValueError):
        score_videos(clips[:2], [1], ["left", "left"])


@pytest.fixture(scope="module")
def gate_score(engine):
    videos, digits, directions = generate_grid(engine, GATE_SEEDS)
    assert videos[0].shape == (NUM_FRAMES, 48, 48, 3)
    score = score_videos(videos, digits, directions)
    print(f"digits-video, CPU float32, seeds {GATE_SEEDS}: {score.summary()}")
    return score


def test_generated_videos_move_the_way_asked(gate_score):
    assert gate_score.direction_accuracy >= 0.9, gate_score.summary()


def test_generated_videos_show_the_digit_asked_for(gate_score):
    assert gate_score.digit_accuracy >= 0.9, gate_score.summary()


def test_caching_settings_are_scored_on_the_video_gate(engine):
    """cache_quality --video: each caching setting over the digit × direction grid, digit and direction scored by
    the video gate beside the uncached run."""
    from ditserve.digits.cache_quality import evaluate, markdown

    settings = [("uncached", {"method": "none"}), ("mask, 2 of 3 steps", {"method": "mask", "compute_steps": [0, 2]})]
    base, cached = evaluate(engine, settings, [0], video=True, num_inference_steps=3)
    assert base["psnr_db"] >= 100 and base["agreement"] == 1.0 and base["passes"]
    assert 0 <= base["direction_accuracy"] <= 1 and 0 <= cached["direction_accuracy"] <= 1
    assert cached["skipped_fraction"] > 0 and cached["psnr_db"] < 100
    assert "| direction right |" in markdown([base, cached])


def diffusers_frames(folder, engine, text: str, seed: int) -> np.ndarray:
    """diffusers' WanPipeline on `folder`, given the engine's defaults explicitly (diffusers ignores ditserve.json)."""
    from diffusers import WanPipeline

    p = engine.defaults()
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        text,
        negative_prompt=p.negative_prompt,
        guidance_scale=p.guidance_scale,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.num_inference_steps,
        max_sequence_length=p.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]


def test_matches_diffusers_wan_pipeline(engine):
    p = engine.defaults()
    assert p.guidance_scale > 1 and p.negative_prompt == ""
    text = "the digit 7 moving up"
    ours = engine.generate(text, seed=3, output_type="np").videos[0]
    theirs = diffusers_frames(video_model_path(), engine, text, seed=3)
    assert ours.shape == theirs.shape == (NUM_FRAMES, 48, 48, 3)
    assert ours.std() > 0.1  # a drawing, not a flat field
    assert np.abs(ours - theirs).max() < 1e-4
    assert motion_directions([ours, theirs]) == ["up", "up"]


def test_cli_generates_an_mp4(tmp_path):
    from ditserve.utils.video import decode_video

    out = tmp_path / "v.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "ditserve", "generate", "--model", "digits-video"]
        + ["--prompt", "the digit 7 moving up", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    frames, fps = decode_video(out.read_bytes())
    assert frames.shape == (NUM_FRAMES, 48, 48, 3) and fps == 8
    assert motion_directions([frames]) == ["up"]


def test_prompt_names_digit_and_direction():
    assert prompt(3, "left") == "the digit 3 moving left"
    assert prompt(3, "left", 1) == "a handwritten digit 3 moving left"
    with pytest.raises(ValueError, match="direction"):
        prompt(3, "sideways")


def test_training_is_seeded_and_writes_a_loadable_folder(tmp_path):
    """Two short runs with one seed write the same weights (the text encoder's trained ones too), in a folder both
    loaders take; another seed differs; a run given a folder's VAE keeps it as it is."""
    from ditserve.digits.train_video import VideoTrainConfig, train

    tiny = dict(scans=8, clips_per_scan=1, vae_steps=2, vae_batch_size=2, dit_steps=3, batch_size=4)
    trained_text = dict(tiny, text_encoder_lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training command runs
    try:
        a, b = (train(VideoTrainConfig(**trained_text), tmp_path / name) for name in "ab")
        c = train(VideoTrainConfig(seed=1, **trained_text), tmp_path / "c")
        d = train(VideoTrainConfig(seed=1, **tiny), tmp_path / "d", vae_from=a)  # the text encoder left frozen
        # trained further by no steps: the folder it started from, byte for byte
        e = train(VideoTrainConfig(**dict(tiny, dit_steps=0)), tmp_path / "e", dit_from=a)
    finally:
        torch.set_num_threads(threads)
    assert "DITSERVE_DISABLE_TRITON" not in os.environ  # training's setting does not leak
    vae_part = "vae/diffusion_pytorch_model.safetensors"
    for part in ("transformer/diffusion_pytorch_model.safetensors", vae_part, "text_encoder/model.safetensors"):
        assert (a / part).read_bytes() == (b / part).read_bytes()
        assert (a / part).read_bytes() != (c / part).read_bytes()
    assert (d / vae_part).read_bytes() == (a / vae_part).read_bytes()
    text_part = "text_encoder/model.safetensors"
    assert (c / text_part).read_bytes() != (d / text_part).read_bytes()  # trained, and not
    assert json.loads((d / "ditserve.json").read_text())["trained_with"]["vae_from"] == str(a)
    for part in ("transformer/diffusion_pytorch_model.safetensors", vae_part, text_part, "vae/config.json"):
        assert (e / part).read_bytes() == (a / part).read_bytes(), part
    continued = json.loads((e / "ditserve.json").read_text())["trained_with"]
    assert continued["dit_from"] == str(a) and continued["dit_from_trained_with"]["text_encoder_lr"] == 1e-3
    with pytest.raises(ValueError, match="num_layers"):
        train(VideoTrainConfig(**dict(tiny, num_layers=1)), tmp_path / "f", dit_from=a)
    vae = json.loads((a / "vae/config.json").read_text())
    assert vae["scale_factor_spatial"] == 4 and len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"]
    assert json.loads((a / "transformer/config.json").read_text())["patch_size"] == [1, 1, 1]
    trained = Engine.from_pretrained(str(a), device="cpu")
    result = trained.generate("the digit 1 moving down", seed=0, output_type="np")
    assert result.videos[0].shape == (NUM_FRAMES, 48, 48, 3) and result.params.num_inference_steps == 12
    # the recipe's 1×1×1 patches: diffusers draws the same frames
    assert np.abs(result.videos[0] - diffusers_frames(a, trained, "the digit 1 moving down", seed=0)).max() < 1e-4


def test_training_encodes_prompts_as_the_pipeline_does():
    """The training loop encodes token rows itself (so that the text encoder can be trained): the same sequences
    as WanPipeline.encode_prompt, zeros past each prompt included."""
    from diffusers import WanPipeline

    from ditserve.digits.train_video import VideoTrainConfig, encode_tokens, prompt_row, prompt_tokens

    pipe = WanPipeline.from_pretrained(video_model_path())
    cfg = VideoTrainConfig()
    ids, mask = prompt_tokens(pipe, cfg)
    rows = torch.cat([prompt_row(torch.tensor([3, 7]), torch.tensor([0, 2]), torch.tensor([0, 1])), torch.tensor([-1])])
    with torch.no_grad():
        ours = encode_tokens(pipe.text_encoder, ids[rows], mask[rows])
        theirs, _ = pipe.encode_prompt(
            [prompt(3, "left"), prompt(7, "up", 1), cfg.negative_prompt],
            do_classifier_free_guidance=False,
            max_sequence_length=cfg.max_sequence_length,
        )
    assert ours.shape == theirs.shape == (3, cfg.max_sequence_length, pipe.text_encoder.config.d_model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_training_command_takes_any_config_field():
    from ditserve.digits.train_video import config_overrides

    got = config_overrides(["vae_base_dim=8", "vae_dim_mult=1,2,2", "vae_lr=0.001", "scans=none", "negative_prompt="])
    assert got == dict(vae_base_dim=8, vae_dim_mult=(1, 2, 2), vae_lr=0.001, scans=None, negative_prompt="")
    with pytest.raises(ValueError, match="vae_base_dim"):
        config_overrides(["vae_base_dims=8"])
    with pytest.raises(ValueError, match="not a int"):
        config_overrides(["vae_steps=many"])


@pytest.mark.gpu
def test_generated_videos_bf16_cuda():
    engine = Engine.from_pretrained("digits-video", device="cuda", dtype="bfloat16")
    videos, digits, directions = generate_grid(engine, range(3))
    score = score_videos(videos, digits, directions)
    print(f"digits-video, CUDA bfloat16, 3 seeds: {score.summary()}")
    assert score.digit_accuracy >= 0.9 and score.direction_accuracy >= 0.9, score.summary()


def test_the_scorer_scores_a_lossy_setting(tmp_path, capsys):
    """The scorer runs the grid under a feature's setting (a request's attention, the engine's quantization) and
    writes the scores beside the setting, for the feature pages' tables."""
    from ditserve.digits.video_quality import main

    out = tmp_path / "fp8.json"
    argv = ["--seeds", "1", "--steps", "1", "--attention", "fp8", "--quantization", "fp8", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["attention"] == "fp8" and report["settings"]["quantization"] == "fp8"
    assert report["settings"]["num_inference_steps"] == 1 and report["settings"]["seeds"] == 1
    assert 0 <= report["digit_accuracy"] <= 1 and set(report["per_direction"]) == {"left", "right", "up", "down"}
    assert "videos: digit" in capsys.readouterr().out
