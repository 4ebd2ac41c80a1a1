"""LoRAs of every FLUX format against diffusers' load_lora_weights + set_adapters on the same base and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_writers import (
    flux_dims,
    kohya_as_diffusers,
    write_ai_toolkit,
    write_diffusers,
    write_kohya,
    write_peft_folder,
    write_xlabs,
)

from ditserve import Engine

CALL = dict(prompt="a red fox", num_inference_steps=4, height=64, width=64)
SEED = 7


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture(scope="module")
def engine(tiny_dev):
    return Engine.from_pretrained(str(tiny_dev))


@pytest.fixture(scope="module")
def base_image(engine):
    return engine.generate(seed=SEED, **CALL).images[0]


def diffusers_image(pipe, adapters: dict[str, str], strengths: list[float]):
    """diffusers' picture with these LoRA files loaded under these names; the pipeline is left as it was."""
    try:
        for name, path in adapters.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(list(adapters), strengths)
        return pipe(generator=torch.Generator("cpu").manual_seed(SEED), **CALL).images[0]
    finally:
        pipe.unload_lora_weights()


def ours(engine, nickname, path, strength):
    engine.set_lora(nickname, str(path), strength)
    try:
        return engine.generate(seed=SEED, **CALL).images[0]
    finally:
        engine.set_lora([])


WRITERS = {
    "diffusers": lambda folder, tmp: write_diffusers(folder, tmp / "diffusers"),
    "ai-toolkit": lambda folder, tmp: write_ai_toolkit(folder, tmp / "ai_toolkit.safetensors"),
    "kohya-flux": lambda folder, tmp: write_kohya(folder, tmp / "kohya.safetensors"),
    "xlabs-flux": lambda folder, tmp: write_xlabs(folder, tmp / "xlabs.safetensors"),
}
EXPECTED_FORMAT = {"diffusers": "diffusers", "ai-toolkit": "diffusers", "kohya-flux": "kohya-flux"}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_format_matches_diffusers(fmt, tiny_dev, tmp_path, engine, base_image, diffusers_pipe):
    path = WRITERS[fmt](tiny_dev, tmp_path)
    strength = 0.8
    mine = ours(engine, f"parity-{fmt}", path, strength)
    theirs = diffusers_image(diffusers_pipe(tiny_dev), {"x": path}, [strength])
    assert mean_level_difference(mine, base_image) > 3  # the LoRA does change the picture
    assert mean_level_difference(mine, theirs) <= 1.0
    info = next(e for e in engine.list_loras()["loaded"] if e["nickname"] == f"parity-{fmt}")
    assert info["format"] == EXPECTED_FORMAT.get(fmt, fmt)


def test_peft_folder_matches_peft_forward(tiny_dev, tmp_path, engine, base_image):
    """A folder saved by PEFT itself, against diffusers running PEFT's own LoRA layers (alpha_pattern included)."""
    from diffusers import FluxPipeline

    folder, peft_model = write_peft_folder(tiny_dev, tmp_path / "peft")
    pipe = FluxPipeline.from_pretrained(tiny_dev, transformer=peft_model.base_model.model)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(generator=torch.Generator("cpu").manual_seed(SEED), **CALL).images[0]
    mine = ours(engine, "parity-peft", folder, 1.0)
    assert mean_level_difference(mine, base_image) > 3
    assert mean_level_difference(mine, theirs) <= 1.0


def test_kohya_fused_linear1_and_top_level_match_diffusers(tiny_dev, tmp_path, engine, base_image, diffusers_pipe):
    """Single blocks' fused linear1 (q, k, v, MLP) as one adapter on our fused layer, and the embedders and final
    layer (with its shift/scale swap), against diffusers applying the same update (see kohya_as_diffusers)."""
    kohya = write_kohya(tiny_dev, tmp_path / "k.safetensors", fused_single=True, top_level=True, seed=8)
    mine = ours(engine, "parity-kohya-full", kohya, 0.6)
    blocks, rest = kohya_as_diffusers(kohya, tmp_path, flux_dims(tiny_dev))
    theirs = diffusers_image(diffusers_pipe(tiny_dev), {"blocks": blocks, "rest": rest}, [0.6, 0.6])
    assert mean_level_difference(mine, base_image) > 3
    assert mean_level_difference(mine, theirs) <= 1.0


def test_two_adapters_merged_and_dynamic(tiny_dev, tmp_path, engine, base_image, diffusers_pipe):
    a = write_ai_toolkit(tiny_dev, tmp_path / "a.safetensors", seed=11)
    b = write_kohya(tiny_dev, tmp_path / "b.safetensors", seed=12)
    strengths = [0.7, -0.5]
    transformer = engine.pipeline.c.transformer
    w0 = {k: v.clone() for k, v in transformer.state_dict().items()}

    state = engine.set_lora(["two-a", "two-b"], [str(a), str(b)], strengths)
    assert state["targets"]["transformer"]["active"] == [
        {"nickname": "two-a", "strength": 0.7},
        {"nickname": "two-b", "strength": -0.5},
    ]
    dynamic = engine.generate(seed=SEED, **CALL).images[0]
    assert all(torch.equal(v, w0[k]) for k, v in transformer.state_dict().items())  # dynamic leaves W0 alone

    state = engine.merge_lora_weights()
    assert state["targets"]["transformer"]["merged"] is True
    merged = engine.generate(seed=SEED, **CALL).images[0]

    theirs = diffusers_image(diffusers_pipe(tiny_dev), {"a": a, "b": b}, strengths)
    assert mean_level_difference(dynamic, base_image) > 3
    assert mean_level_difference(merged, dynamic) <= 0.1
    assert mean_level_difference(merged, theirs) <= 1.0

    state = engine.unmerge_lora_weights()
    assert state["targets"]["transformer"]["mode"] == "off"
    assert all(torch.equal(v, w0[k]) for k, v in transformer.state_dict().items())
    assert np.array_equal(np.asarray(engine.generate(seed=SEED, **CALL).images[0]), np.asarray(base_image))

    # merge again without a path: the adapter set was kept; set_lora([]) then turns LoRA off entirely.
    engine.merge_lora_weights(strength=1.0)
    assert np.array_equal(np.asarray(engine.generate(seed=SEED, **CALL).images[0]), np.asarray(merged))
    engine.set_lora([])
    assert all(torch.equal(v, w0[k]) for k, v in transformer.state_dict().items())
    assert engine.list_loras()["targets"]["transformer"]["mode"] == "off"


def test_bfl_names_with_peft_keys_equal_kohya(tiny_dev, tmp_path, engine):
    """The same tensors under ai-toolkit/ComfyUI's BFL naming (`diffusion_model.<dotted>.lora_A`) and under kohya's
    give the same picture (kohya's is checked against diffusers above; diffusers has no loader for the former at
    this size)."""
    from safetensors.torch import load_file, save_file

    kohya = write_kohya(tiny_dev, tmp_path / "k.safetensors", seed=13, fused_single=True)
    renamed = {}
    for key, value in load_file(str(kohya)).items():
        module, suffix = key.split(".", 1)
        dotted = module.removeprefix("lora_unet_")
        for a, b in (("double_blocks_", "double_blocks."), ("single_blocks_", "single_blocks.")):
            dotted = dotted.replace(a, b)
        dotted = dotted.replace("_img_", ".img_").replace("_txt_", ".txt_").replace("_attn_", "_attn.")
        dotted = (
            dotted.replace("_mlp_", "_mlp.")
            .replace("_mod_lin", "_mod.lin")
            .replace("_modulation_lin", ".modulation.lin")
        )
        dotted = dotted.replace("_linear", ".linear")
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        renamed[f"diffusion_model.{dotted}.{suffix}"] = value
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in renamed
    assert "diffusion_model.single_blocks.1.linear1.alpha" in renamed
    bfl = tmp_path / "bfl.safetensors"
    save_file(renamed, str(bfl))
    a = ours(engine, "eq-kohya", kohya, 0.9)
    b = ours(engine, "eq-bfl", bfl, 0.9)
    assert next(e for e in engine.list_loras()["loaded"] if e["nickname"] == "eq-bfl")["format"] == "bfl-flux"
    assert np.array_equal(np.asarray(a), np.asarray(b))
