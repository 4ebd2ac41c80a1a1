"""Format detection and conversion to the canonical form, without a model (names, fused targets, scaling)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ditserve.lora import LoRAError, convert, load_canonical


def pair(out: int, inp: int, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def by_targets(lora) -> dict[tuple[str, ...], object]:
    return {m.targets: m for m in lora.modules}


def test_wan_lightx2v_lora_down_up_alpha():
    a, b = pair(64, 32, rank=8)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
        "diffusion_model.blocks.3.cross_attn.k_img.lora_down.weight": a,
        "diffusion_model.blocks.3.cross_attn.k_img.lora_up.weight": b,
        "diffusion_model.blocks.3.ffn.2.lora_down.weight": a,
        "diffusion_model.blocks.3.ffn.2.lora_up.weight": b,
        "diffusion_model.head.head.lora_down.weight": a,
        "diffusion_model.head.head.lora_up.weight": b,
        "diffusion_model.time_projection.1.lora_down.weight": a,
        "diffusion_model.time_projection.1.lora_up.weight": b,
        "diffusion_model.blocks.0.norm3.diff": torch.zeros(32),  # LightX2V writes zero norm diffs
    }
    lora = convert(sd)
    assert (lora.format, lora.architecture) == ("wan", "wan")
    m = by_targets(lora)
    assert set(m) == {
        ("blocks.0.attn1.to_q",),
        ("blocks.3.attn2.add_k_proj",),
        ("blocks.3.ffn.net.2",),
        ("proj_out",),
        ("condition_embedder.time_proj",),
    }
    assert m[("blocks.0.attn1.to_q",)].scale == pytest.approx(4.0 / 8)
    assert m[("proj_out",)].scale == 1.0  # no alpha: alpha = rank
    assert torch.equal(m[("blocks.0.attn1.to_q",)].down, a) and torch.equal(m[("blocks.0.attn1.to_q",)].up, b)
    assert lora.ignored == ["diffusion_model.blocks.0.norm3.diff"]


def test_wan_lora_a_b_and_musubi_flattened():
    a, b = pair(16, 16)
    lora = convert(
        {
            "diffusion_model.blocks.1.cross_attn.o.lora_A.weight": a,
            "diffusion_model.blocks.1.cross_attn.o.lora_B.weight": b,
        }
    )
    assert [m.targets for m in lora.modules] == [("blocks.1.attn2.to_out.0",)]
    musubi = convert(
        {
            "lora_unet_blocks_12_self_attn_v.lora_down.weight": a,
            "lora_unet_blocks_12_self_attn_v.lora_up.weight": b,
            "lora_unet_blocks_12_self_attn_v.alpha": torch.tensor(1.0),
        }
    )
    assert musubi.architecture == "wan"
    assert musubi.modules[0].targets == ("blocks.12.attn1.to_v",)
    assert musubi.modules[0].scale == pytest.approx(0.25)


def test_qwen_image_prefixed_and_kohya_flattened():
    a, b = pair(16, 16)
    plain = convert(
        {
            "diffusion_model.transformer_blocks.5.img_mlp.net.0.proj.lora_A.weight": a,
            "diffusion_model.transformer_blocks.5.img_mlp.net.0.proj.lora_B.weight": b,
            "diffusion_model.transformer_blocks.5.attn.add_k_proj.lora_A.weight": a,
            "diffusion_model.transformer_blocks.5.attn.add_k_proj.lora_B.weight": b,
        }
    )
    assert plain.architecture == "qwen-image"
    assert {m.targets for m in plain.modules} == {
        ("transformer_blocks.5.img_mlp.net.0.proj",),
        ("transformer_blocks.5.attn.add_k_proj",),
    }
    kohya = convert(
        {
            "lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight": a,
            "lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight": b,
            "lora_unet_transformer_blocks_0_img_mod_1.alpha": torch.tensor(8.0),
            "lora_unet_transformer_blocks_0_attn_to_add_out.lora_down.weight": a,
            "lora_unet_transformer_blocks_0_attn_to_add_out.lora_up.weight": b,
            "lora_unet_transformer_blocks_0_attn_to_add_out.alpha": torch.tensor(8.0),
            "lora_unet_time_text_embed_timestep_embedder_linear_1.lora_down.weight": a,
            "lora_unet_time_text_embed_timestep_embedder_linear_1.lora_up.weight": b,
        },
        prefer_architecture="qwen-image",
    )
    assert kohya.architecture == "qwen-image"
    m = by_targets(kohya)
    assert set(m) == {
        ("transformer_blocks.0.img_mod.1",),
        ("transformer_blocks.0.attn.to_add_out",),
        ("time_text_embed.timestep_embedder.linear_1",),
    }
    assert m[("transformer_blocks.0.img_mod.1",)].scale == pytest.approx(2.0)


def test_bfl_names_with_peft_keys_fuse_and_swap():
    """ai-toolkit/ComfyUI/fal BFL naming: fused qkv and linear1 keep one adapter; the final modulation is swapped."""
    a, b = pair(12, 8)
    ada, adb = pair(6, 8)
    lora = convert(
        {
            "diffusion_model.double_blocks.3.txt_attn.qkv.lora_A.weight": a,
            "diffusion_model.double_blocks.3.txt_attn.qkv.lora_B.weight": b,
            "base_model.model.single_blocks.7.linear1.lora_A.weight": a,
            "base_model.model.single_blocks.7.linear1.lora_B.weight": b,
            "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight": ada,
            "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight": adb,
        }
    )
    assert (lora.format, lora.architecture) == ("bfl-flux", "flux")
    m = by_targets(lora)
    qkv = m[
        (
            "transformer_blocks.3.attn.add_q_proj",
            "transformer_blocks.3.attn.add_k_proj",
            "transformer_blocks.3.attn.add_v_proj",
        )
    ]
    assert torch.equal(qkv.up, b)  # one pair, not three copies
    assert (
        "single_transformer_blocks.7.attn.to_q",
        "single_transformer_blocks.7.attn.to_k",
        "single_transformer_blocks.7.attn.to_v",
        "single_transformer_blocks.7.proj_mlp",
    ) in m
    final = m[("norm_out.linear",)]
    assert torch.equal(final.up, torch.cat([adb[3:], adb[:3]]))


def test_peft_config_alpha_pattern_and_rslora(tmp_path):
    a, b = pair(8, 8, rank=4)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(
        {
            "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": a,
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": b,
            "base_model.model.proj_out.lora_A.weight": a.clone(),
            "base_model.model.proj_out.lora_B.weight": b.clone(),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"proj_out": 2}, "use_rslora": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    lora = load_canonical(folder)
    m = by_targets(lora)
    assert lora.format == "peft"
    assert m[("transformer_blocks.0.attn.to_q",)].scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert m[("proj_out",)].scale == pytest.approx(2 / 2)


def test_diffusers_metadata_alpha(tmp_path):
    a, b = pair(8, 8, rank=4)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 2}
    path = tmp_path / "l.safetensors"
    save_file(
        {"transformer.x_embedder.lora_A.weight": a, "transformer.x_embedder.lora_B.weight": b},
        str(path),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)},
    )
    assert load_canonical(path).modules[0].scale == pytest.approx(0.5)


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"foo.weight": torch.zeros(2, 2)}, "unknown LoRA format: keys foo.weight"),
        (
            {"some.thing.lora_A.weight": torch.zeros(2, 2), "some.thing.lora_B.weight": torch.zeros(2, 2)},
            "match no known naming",
        ),
        ({"transformer.proj_out.lora_A.weight": torch.zeros(2, 2)}, "without both halves"),
        (
            {
                "transformer.proj_out.lora_A.weight": torch.zeros(2, 2),
                "transformer.proj_out.lora_B.weight": torch.zeros(2, 2),
                "transformer.proj_out.lora_magnitude_vector": torch.zeros(2),
            },
            "DoRA",
        ),
        (
            {"diffusion_model.blocks.0.self_attn.q.diff": torch.ones(4, 4)},
            "full-weight differences",
        ),
        (
            {
                "transformer.proj_out.lora_A.weight": torch.zeros(2, 3),
                "transformer.proj_out.lora_B.weight": torch.zeros(2, 3),
            },
            "not a low-rank pair",
        ),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}, "no transformer LoRA"),
    ],
)
def test_bad_files_are_refused_with_the_keys_named(sd, message):
    with pytest.raises(LoRAError, match=message) as e:
        convert(sd)
    assert e.value.field == "lora_path"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("role", ["lora_A", "lora_B"])
def test_non_finite_tensors_are_refused_by_name(role, bad):
    a, b = pair(8, 8)
    sd = {"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b}
    sd[f"transformer.proj_out.{role}.weight"][1, 2] = bad
    with pytest.raises(LoRAError, match=f"tensor transformer.proj_out.{role}.weight holds NaN or infinite") as e:
        convert(sd)
    assert e.value.field == "lora_path"
    sd = {"lora_unet_img_in.lora_down.weight": a, "lora_unet_img_in.lora_up.weight": b}
    sd["lora_unet_img_in.lora_down.weight"] = torch.ones(4, 8)
    sd["lora_unet_img_in.lora_up.weight"] = torch.ones(8, 4)
    sd["lora_unet_img_in.alpha"] = torch.tensor(bad)
    with pytest.raises(LoRAError, match="lora_unet_img_in.alpha holds NaN"):
        convert(sd)


def test_text_encoder_keys_are_ignored_and_counted():
    a, b = pair(4, 4)
    lora = convert(
        {
            "lora_unet_img_in.lora_down.weight": a,
            "lora_unet_img_in.lora_up.weight": b,
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b,
        }
    )
    assert lora.format == "kohya-flux" and [m.targets for m in lora.modules] == [("x_embedder",)]
    assert len(lora.ignored) == 2


def test_bad_paths(tmp_path):
    with pytest.raises(LoRAError, match="no such file"):
        load_canonical(tmp_path / "missing.safetensors")
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(LoRAError, match="only .safetensors"):
        load_canonical(tmp_path / "x.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        load_canonical(tmp_path / "broken.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="no .safetensors file"):
        load_canonical(tmp_path / "empty")


def test_diffusers_alpha_keys_and_kohya_on_diffusers_names():
    a, b = pair(8, 8, rank=4)
    lora = convert(
        {
            "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": a,
            "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": b,
            "transformer.single_transformer_blocks.0.proj_out.alpha": torch.tensor(1.0),
        }
    )
    assert lora.format == "diffusers" and lora.modules[0].scale == pytest.approx(0.25)
    mixture = convert(
        {
            "lora_transformer_single_transformer_blocks_3_attn_to_k.lora_down.weight": a,
            "lora_transformer_single_transformer_blocks_3_attn_to_k.lora_up.weight": b,
            "lora_transformer_single_transformer_blocks_3_attn_to_k.alpha": torch.tensor(8.0),
        }
    )
    assert mixture.format == "kohya-diffusers-flux"
    assert mixture.modules[0].targets == ("single_transformer_blocks.3.attn.to_k",)
    assert mixture.modules[0].scale == pytest.approx(2.0)


def test_folder_with_one_safetensors_file(tmp_path):
    """diffusers' save_lora_weights writes a folder holding pytorch_lora_weights.safetensors: the folder loads."""
    a, b = pair(8, 8)
    (tmp_path / "lora").mkdir()
    save_file(
        {"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b},
        str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
    )
    lora = load_canonical(tmp_path / "lora")
    assert lora.format == "diffusers" and lora.modules[0].targets == ("proj_out",)
