"""The ComfyUI custom nodes (comfyui/ditserve_nodes) inside a real ComfyUI, run headlessly by ComfyUI's own executor.

Skipped unless COMFYUI_DIR names a ComfyUI checkout whose dependencies this Python can import (docs/comfyui.md says
which checkout and how). Shows: our DiT's forward inside the node equals ComfyUI's own FLUX forward; a workflow with
only the loader swapped gives ComfyUI's own image; the digits workflow draws the digits asked for; the server-mode
nodes generate against a `ditserve serve`; bad inputs give one clear line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (docs/comfyui.md)")

NODES_DIR = Path(__file__).resolve().parent.parent / "comfyui"
# A tiny FLUX.1 that ComfyUI's own loader can read: heads of 128 and the FLUX VAE's 16 latent channels (ComfyUI
# detects nothing else), text width 32 to match the tiny encoders of the folder that gives CLIP and VAE.
TINY = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=256, mlp_ratio=4.0,
            num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True, txt_ids_dims=[])  # fmt: skip


def _import_comfyui() -> None:
    """Import ComfyUI from COMFYUI_DIR and our node package.

    The PyPI torchvision wheels need a CUDA torch; a CPU-only environment has none. A few ComfyUI modules import
    `torchvision.transforms` at import time for models these tests never build (Cosmos, Stable Cascade), so while
    ComfyUI's modules are imported an empty stand-in answers that import; it is removed right after, so no other
    library sees a torchvision. diffusers and transformers are imported before it, for the same reason."""
    sys.path[:0] = [COMFYUI_DIR, str(NODES_DIR)]
    import diffusers.loaders.peft  # noqa: F401
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    stand_in = importlib.util.find_spec("torchvision") is None
    if stand_in:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
    try:
        import comfy.model_base  # noqa: F401
        import comfy_extras.nodes
        from comfy.nodes import base_nodes
        from comfy.nodes.package import _import_and_enumerate_nodes_in_module

        for module in (base_nodes, comfy_extras.nodes):  # ComfyUI's own nodes, as its executor imports them
            _import_and_enumerate_nodes_in_module(module)
    finally:
        if stand_in:
            del sys.modules["torchvision"], sys.modules["torchvision.transforms"]


class ComfyRunner:
    """ComfyUI's embedded client (its executor, in this process) with our nodes added; runs API-format prompts."""

    def __init__(self, base: Path):
        import ditserve_nodes
        from comfy.cli_args import default_configuration
        from comfy.client.embedded_comfy_client import Comfy
        from comfy.execution_context import context_add_custom_nodes
        from comfy.nodes.package_typing import ExportedNodes

        self.base = base
        self.config = default_configuration()
        self.config.base_directory = str(base)
        self.config.disable_all_custom_nodes = True  # ours come in through the context below
        self.nodes = ExportedNodes(
            NODE_CLASS_MAPPINGS=ditserve_nodes.NODE_CLASS_MAPPINGS,
            NODE_DISPLAY_NAME_MAPPINGS=ditserve_nodes.NODE_DISPLAY_NAME_MAPPINGS,
        )
        self._client, self._nodes_context = Comfy, context_add_custom_nodes

    def run_all(self, prompts: list[dict]) -> list[dict]:
        """Each prompt's outputs, run one after another by one client (its executor caches what they share)."""

        async def run() -> list[dict]:
            with self._nodes_context(self.nodes):
                async with self._client(self.config, executor="ContextVarExecutor") as client:
                    return [await client.queue_prompt(p) for p in prompts]

        return asyncio.run(run())

    def run(self, prompt: dict) -> dict:
        return self.run_all([prompt])[0]

    def images(self, prompts: list[dict], node: str) -> list[np.ndarray]:
        """The images the `node` (a SaveImage) of each prompt wrote."""
        return [
            np.asarray(Image.open(i["abs_path"]).convert("RGB"))
            for outputs in self.run_all(prompts)
            for i in outputs[node]["images"]
        ]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    _import_comfyui()
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    return ComfyRunner(base)


@pytest.fixture(scope="module")
def tiny_comfy_flux(runner):
    """ComfyUI's own FLUX module, random weights, and the same weights as a single file in ComfyUI's key names."""
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = comfy.ldm.flux.model.Flux(
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **TINY
    )
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.02)
    path = runner.base / "models" / "diffusion_models" / "tiny-flux.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference.eval(), path


@pytest.fixture(scope="module")
def text_and_vae_folder(tmp_path_factory):
    """A diffusers folder whose text encoders and VAE fit the tiny ComfyUI FLUX above (the folder loader's CLIP and
    VAE serve both workflows; its transformer is not used)."""
    from ditserve.tiny.flux import TinyFluxSpec, make_tiny_flux

    spec = TinyFluxSpec(num_layers=1, num_single_layers=1, attention_head_dim=16, latent_channels=16, text_dim=32)
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-te-vae"), spec)


def test_forward_equals_comfyui_flux(runner, tiny_comfy_flux):
    import comfy.sd
    from ditserve_nodes.checkpoint import load_dit, load_dit_from_state_dict
    from ditserve_nodes.model import DiTHandle, comfy_model

    reference, path = tiny_comfy_flux
    ours = comfy_model(DiTHandle(load_dit(str(path), torch.device("cpu"), torch.float32)))
    assert sum(p.numel() for p in ours.model.parameters()) == 0  # ComfyUI sees none of our weights
    torch.manual_seed(1)
    x, t = torch.randn(2, 16, 10, 6), torch.tensor([0.7, 0.3])
    context, pooled, guidance = torch.randn(2, 5, 32), torch.randn(2, 32), torch.tensor([3.5, 2.0])
    with torch.no_grad():
        expected = reference(x, t, context, y=pooled, guidance=guidance)
        got = ours.model.diffusion_model(x, t, context, y=pooled, guidance=guidance)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The same weights handed over in memory (the GPU benchmark's path) load the same model.
        from_memory = DiTHandle(load_dit_from_state_dict(reference.state_dict(), torch.device("cpu"), torch.float32))
        torch.testing.assert_close(
            comfy_model(from_memory).model.diffusion_model(x, t, context, y=pooled, guidance=guidance), got
        )
        # The whole model call (model sampling included) against ComfyUI's loader on the same file.
        theirs = comfy.sd.load_diffusion_model(str(path))
        assert theirs.model.model_type == ours.model.model_type
        torch.testing.assert_close(
            ours.model.apply_model(x, t, c_crossattn=context, y=pooled, guidance=guidance),
            theirs.model.apply_model(x, t, c_crossattn=context, y=pooled, guidance=guidance),
            rtol=1e-5,
            atol=1e-5,
        )


def _workflow(loader: str, unet_name: str, folder: Path) -> dict:
    dtype = "default" if loader == "UNETLoader" else "float32"
    return {
        "1": {"class_type": "DitserveFolderLoader", "inputs": {"folder": str(folder), "weight_dtype": "float32"}},
        "2": {"class_type": loader, "inputs": {"unet_name": unet_name, "weight_dtype": dtype}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "7": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 3,
                "steps": 4,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["5", 0],
                "negative": ["4", 0],
                "latent_image": ["6", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": loader}},
    }


def test_workflow_with_only_the_loader_swapped(runner, tiny_comfy_flux, text_and_vae_folder):
    _, path = tiny_comfy_flux
    workflows = [
        _workflow(loader, path.name, text_and_vae_folder) for loader in ("UNETLoader", "DitserveDiffusionModelLoader")
    ]
    theirs, ours = runner.images(workflows, "9")
    theirs = theirs.astype(np.int16)
    diff = np.abs(ours.astype(np.int16) - theirs)
    assert theirs.std() > 5  # a picture, not a flat field
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())  # 8-bit rounding of equal floats


def _digits_workflow(digit: int, seed: int) -> dict:
    """The shipped example workflow (workflows/integrated_digits.json), one image of `digit` at `seed`."""
    workflow = json.loads((NODES_DIR / "ditserve_nodes" / "workflows" / "integrated_digits.json").read_text())
    workflow["1"]["inputs"]["weight_dtype"] = "float32"
    workflow["2"]["inputs"]["text"] = f"the digit {digit}"
    workflow["4"]["inputs"]["batch_size"] = 1
    workflow["5"]["inputs"]["seed"] = seed
    workflow["7"]["inputs"]["filename_prefix"] = f"digit{digit}"
    return workflow


def test_digits_workflow_draws_the_digit_asked_for(runner):
    from ditserve.digits.quality import score_images

    digits = [d for d in range(10) for _ in range(2)]
    images = runner.images([_digits_workflow(d, seed=i) for i, d in enumerate(digits)], "7")
    assert images[0].shape == (32, 32, 3)
    score = score_images([Image.fromarray(im) for im in images], digits)
    assert score.overall >= 0.9, score.summary()


def test_bad_inputs_are_one_clear_line(runner, tmp_path):
    from ditserve_nodes.checkpoint import load_dit
    from ditserve_nodes.errors import NodeInputError
    from safetensors.torch import save_file

    with pytest.raises(NodeInputError, match="model: .*does not exist"):
        load_dit(str(tmp_path / "nope.safetensors"), torch.device("cpu"), torch.float32)
    flux2_like = tmp_path / "flux2.safetensors"
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(2, 2), "img_in.weight": torch.zeros(2, 2)},
              str(flux2_like))  # fmt: skip
    with pytest.raises(NodeInputError, match="FLUX.2 checkpoint"):
        load_dit(str(flux2_like), torch.device("cpu"), torch.float32)
    # Through ComfyUI's executor: the error it reports is our line.
    bad = _digits_workflow(1, 0)
    bad["1"]["inputs"]["folder"] = str(tmp_path / "missing-folder")
    with pytest.raises(Exception, match="folder: model .*no such folder"):
        runner.run(bad)


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory):
    from ditserve.server.launch import start_server

    server = start_server("digits", "--api-key", "k3y", log_path=str(tmp_path_factory.mktemp("srv") / "log"))
    yield server
    server.stop()


def test_server_nodes_against_ditserve_serve(runner, digits_server):
    from ditserve_nodes.errors import NodeInputError
    from ditserve_nodes.server_nodes import (
        DitserveServerGenerateImage,
        DitserveServerGenerateVideo,
        DitserveServerSetLoRA,
    )

    from ditserve.digits.quality import score_images

    url = digits_server.url
    node = DitserveServerGenerateImage()
    (images,) = node.generate(url, "k3y", "the digit 3", "", 32, 32, 0, -1.0, 7, 2)
    assert tuple(images.shape) == (2, 32, 32, 3) and images.dtype == torch.float32
    pictures = [Image.fromarray((im.numpy() * 255).round().astype(np.uint8)) for im in images]
    assert score_images(pictures, [3, 3]).overall == 1.0

    with pytest.raises(NodeInputError, match="api_key: .*401"):
        node.generate(url, "wrong", "the digit 3", "", 32, 32, 0, -1.0, 7, 1)
    with pytest.raises(NodeInputError, match="size"):
        node.generate(url, "k3y", "the digit 3", "", 4096, 4096, 0, -1.0, 7, 1)
    with pytest.raises(NodeInputError, match="server_url: cannot reach"):
        node.generate("http://127.0.0.1:9", "k3y", "the digit 3", "", 32, 32, 0, -1.0, 7, 1)
    with pytest.raises(NodeInputError, match="does not generate video"):
        DitserveServerGenerateVideo().generate(url, "k3y", "the digit 3", "", 32, 32, 0, -1.0, 7, 1)
    # LoRA off (an empty list) is accepted; a LoRA on a server without --lora-dir is refused with its reason.
    (state,) = DitserveServerSetLoRA().set_lora(url, "k3y", "", "1.0")
    assert "transformer" in state
    with pytest.raises(NodeInputError, match="lora"):
        DitserveServerSetLoRA().set_lora(url, "k3y", "style.safetensors", "0.5")
