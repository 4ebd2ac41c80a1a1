"""Our FLUX DiT against diffusers' FluxTransformer2DModel with the same weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.flux import FluxConfig, FluxTransformer, map_diffusers_key, to_diffusers_state_dict

BASE = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)
CASES = {
    "dev": dict(config={}, batch=1, grid=(4, 4), text=8),
    "schnell": dict(config={"guidance_embeds": False}, batch=1, grid=(4, 4), text=8),
    "non_square": dict(config={"num_attention_heads": 3, "num_single_layers": 3}, batch=1, grid=(3, 7), text=5),
    "batch2": dict(config={"num_layers": 3, "in_channels": 64}, batch=2, grid=(6, 4), text=11),
    "wide_head": dict(config={"attention_head_dim": 32, "axes_dims_rope": [8, 12, 12]}, batch=2, grid=(5, 5), text=4),
}


def ids_for(h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(-1, 3), torch.zeros(text, 3)


def random_reference(config: dict, seed: int, dtype=torch.float32, device="cpu") -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():  # every parameter random, also those diffusers initialises to zero
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref.to(device=device, dtype=dtype)


def ours_from(ref: FluxTransformer2DModel, config: dict, dtype=torch.float32, device="cpu") -> FluxTransformer:
    model = materialize(
        build_on_meta(lambda: FluxTransformer(FluxConfig.from_dict(config)), dtype), torch.device(device)
    )
    load_checkpoint(model, iter(ref.state_dict().items()), map_diffusers_key)
    return model.eval()


def run_both(ref, ours, config, batch, grid, text, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    x = torch.randn(batch, h * w, config["in_channels"], generator=g).to(device, dtype)
    enc = torch.randn(batch, text, config["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype)
    t = torch.rand(batch, generator=g).to(device, dtype)
    guidance = torch.full((batch,), 3.5, device=device) if config["guidance_embeds"] else None
    img_ids, txt_ids = (i.to(device, dtype) for i in ids_for(h, w, text))
    with torch.no_grad():
        expected = ref(
            hidden_states=x,
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        got = ours(x, enc, pooled, t, img_ids, txt_ids, guidance)
    return expected, got


@pytest.mark.parametrize("case", sorted(CASES))
def test_dit_matches_diffusers_fp32(case):
    spec = CASES[case]
    config = {**BASE, **spec["config"]}
    ref = random_reference(config, seed=len(case))
    ours = ours_from(ref, config)
    expected, got = run_both(ref, ours, config, spec["batch"], spec["grid"], spec["text"])
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # a real signal, not near-zero outputs that would pass anything
    assert (got - expected).abs().max().item() <= 1e-4


def test_state_dict_round_trip():
    ref = random_reference(BASE, seed=7)
    ours = ours_from(ref, BASE)
    back = to_diffusers_state_dict(ours)
    expected = ref.state_dict()
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_guidance_required_for_dev():
    ref = random_reference(BASE, seed=1)
    ours = ours_from(ref, BASE)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, torch.randn(1, 3, 32), torch.randn(1, 24), torch.rand(1), *ids_for(2, 2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dev", "batch2", "non_square"])
def test_dit_matches_diffusers_bf16_cuda(case):
    spec = CASES[case]
    config = {**BASE, **spec["config"]}
    ref = random_reference(config, seed=3, dtype=torch.bfloat16, device="cuda")
    ours = ours_from(ref, config, dtype=torch.bfloat16, device="cuda")
    expected, got = run_both(ref, ours, config, spec["batch"], spec["grid"], spec["text"], torch.bfloat16, "cuda")
    rel = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    print(f"bf16 cuda {case}: max abs {(got - expected).abs().max().item():.4g}, relative {rel:.3g}")
    assert rel < 2e-2
