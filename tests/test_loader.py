"""Loading diffusers folders, and every way a folder or checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ditserve import Engine, LoaderError
from ditserve.loader.folder import resolve_model


def copy_folder(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def transformer_file(folder):
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"


def test_missing_folder():
    with pytest.raises(LoaderError, match="no such folder"):
        resolve_model("/definitely/not/here")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(LoaderError, match="not a folder"):
        resolve_model(str(f))


def test_missing_model_index(tmp_path):
    with pytest.raises(LoaderError, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_unknown_class_name(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="no native family serves pipeline class 'StableDiffusionPipeline'"):
        resolve_model(str(folder), backend="native")
    source = resolve_model(str(folder))  # auto: diffusers runs what no native family serves
    assert source.backend == "diffusers" and "no native family serves" in source.backend_reason


def test_missing_component(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(LoaderError, match="missing component folder.*vae"):
        resolve_model(str(folder))


def test_missing_keys_are_listed(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    weights = load_file(transformer_file(folder))
    del weights["transformer_blocks.0.attn.to_k.weight"]
    del weights["proj_out.bias"]
    save_file(weights, transformer_file(folder))
    with pytest.raises(
        LoaderError, match=r"missing 2 weights: .*double_blocks\.0\.img_attn\.qkv\.weight.*proj_out\.bias"
    ):
        Engine.from_pretrained(str(folder))


def test_unexpected_keys_are_listed(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    weights = load_file(transformer_file(folder))
    weights["transformer_blocks.0.attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, transformer_file(folder))
    with pytest.raises(LoaderError, match=r"unexpected 1 keys: transformer_blocks\.0\.attn\.extra_proj\.weight"):
        Engine.from_pretrained(str(folder))


def test_mis_shaped_keys_are_listed(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    weights = load_file(transformer_file(folder))
    weights["x_embedder.weight"] = torch.zeros(3, 3)
    save_file(weights, transformer_file(folder))
    with pytest.raises(LoaderError, match=r"1 mis-shaped: x_embedder\.weight .*\(3, 3\)"):
        Engine.from_pretrained(str(folder))


def test_no_weights_says_use_dummy(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    transformer_file(folder).unlink()
    with pytest.raises(LoaderError, match="no .safetensors weights.*dummy"):
        Engine.from_pretrained(str(folder))


def test_index_naming_absent_shard(tiny_sharded, tmp_path):
    folder = copy_folder(tiny_sharded, tmp_path)
    shard = sorted((folder / "transformer").glob("*-00001-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LoaderError, match="names shards that are not in"):
        Engine.from_pretrained(str(folder))


def test_sharded_loads_same_weights_as_single(tiny_sharded):
    engine = Engine.from_pretrained(str(tiny_sharded))
    reference = {}
    for shard in (tiny_sharded / "transformer").glob("*.safetensors"):
        reference.update(load_file(shard))
    from ditserve.models.flux import to_diffusers_state_dict

    ours = to_diffusers_state_dict(engine.pipeline.c.transformer)
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_preset_needs_dummy():
    with pytest.raises(LoaderError, match="preset.*load_format='dummy'"):
        resolve_model("flux.1-dev")


def test_dummy_from_config_only_folder(tiny_dev, tmp_path):
    folder = copy_folder(tiny_dev, tmp_path)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    engine = Engine.from_pretrained(str(folder), load_format="dummy")
    result = engine.generate("x", num_inference_steps=2, height=32, width=32, seed=0)
    assert result.images[0].size == (32, 32)
    # Dummy weights are deterministic: a second engine makes the same picture.
    again = Engine.from_pretrained(str(folder), load_format="dummy").generate(
        "x", num_inference_steps=2, height=32, width=32, seed=0
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


def test_presets_hold_the_real_architecture():
    from ditserve.loader.weights import build_on_meta
    from ditserve.models.flux import FluxConfig, FluxTransformer
    from ditserve.registry import get_preset

    for name, guidance in (("flux.1-dev", True), ("flux.1-schnell", False)):
        cfg = FluxConfig.from_dict(get_preset(name)[1].configs["transformer"])
        model = build_on_meta(lambda cfg=cfg: FluxTransformer(cfg), torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        assert (model.guidance_embedder is not None) == guidance
        # FLUX.1-dev has 11.90 B parameters in its transformer; schnell lacks the guidance embedder.
        assert abs(params - (11_901_408_320 if guidance else 11_891_178_560)) < 1e6, params


def test_folder_sampling_defaults(tiny_schnell, tmp_path):
    """A folder's ditserve.json replaces the pipeline's defaults it names; unknown names are refused."""
    folder = copy_folder(tiny_schnell, tmp_path)
    (folder / "ditserve.json").write_text(json.dumps({"sampling_defaults": {"height": 32, "num_inference_steps": 3}}))
    result = Engine.from_pretrained(str(folder)).generate("x", seed=0)
    p = result.params
    assert (p.height, p.width, p.num_inference_steps, p.max_sequence_length) == (32, 256, 3, 512)
    assert result.images[0].size == (256, 32)
    (folder / "ditserve.json").write_text(json.dumps({"sampling_defaults": {"size": 32}}))
    with pytest.raises(LoaderError, match="unknown sampling defaults"):
        Engine.from_pretrained(str(folder))


def test_folder_negative_prompt_default(tiny_schnell, tmp_path):
    """A default negative_prompt (with true_cfg_scale > 1) turns true CFG on for requests that name neither."""
    folder = copy_folder(tiny_schnell, tmp_path)
    defaults = {"height": 32, "width": 32, "num_inference_steps": 2, "true_cfg_scale": 3.0, "negative_prompt": "fog"}
    (folder / "ditserve.json").write_text(json.dumps({"sampling_defaults": defaults}))
    engine = Engine.from_pretrained(str(folder))
    default = engine.generate("x", seed=0)
    assert (default.params.negative_prompt, default.params.true_cfg_scale) == ("fog", 3.0)
    explicit = engine.generate("x", seed=0, negative_prompt="fog", true_cfg_scale=3.0)
    assert np.array_equal(np.asarray(default.images[0]), np.asarray(explicit.images[0]))
    other = engine.generate("x", seed=0, negative_prompt="rain")  # a request's own negative prompt wins
    assert other.params.negative_prompt == "rain"
    off = engine.generate("x", seed=0, true_cfg_scale=1.0)  # and CFG can be turned off
    assert not np.array_equal(np.asarray(default.images[0]), np.asarray(off.images[0]))
    (folder / "ditserve.json").write_text(json.dumps({"sampling_defaults": {"negative_prompt": ["fog"]}}))
    with pytest.raises(LoaderError, match="negative_prompt must be a string"):
        Engine.from_pretrained(str(folder))
