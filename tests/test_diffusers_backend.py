"""The diffusers backend on tiny random folders of four families we have no native DiT for (SD3 and Sana make
images, LTX-Video and HunyuanVideo videos) and on FLUX.1: our CLI, Python API, server and LoRA give diffusers' own
results for the same seed; what a pipeline cannot take is refused naming the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ditserve import ConfigError, Engine
from ditserve.cli import main
from ditserve.lora import LoRAError
from ditserve.tiny import backend as tiny

SIZE = {"height": 32, "width": 32, "num_inference_steps": 2}
# Per family: its writer, and what a request needs beyond SIZE (Sana bins sizes to its trained ones unless told not to).
FAMILIES = {
    "sd3": (tiny.make_tiny_sd3, {}, {}),
    "sana": (tiny.make_tiny_sana, {}, {"use_resolution_binning": False}),
    "ltx-video": (tiny.make_tiny_ltx_video, {"num_frames": 5}, {}),
    "hunyuan-video": (tiny.make_tiny_hunyuan_video, {"num_frames": 5}, {}),
}


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {name: make(tmp_path_factory.mktemp(name)) for name, (make, _, _) in FAMILIES.items()}


@pytest.fixture(scope="session")
def reference():
    """diffusers' own pipeline per folder (loaded once)."""
    import diffusers

    cache: dict = {}

    def get(path: Path):
        if path not in cache:
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            cache[path] = pipe
        return cache[path]

    return get


def diffusers_output(pipe, family: str, prompt: str, seed: int) -> np.ndarray:
    """diffusers called directly: uint8 pixels (videos: frames scaled as export_to_video scales them)."""
    _, extra, options = FAMILIES[family]
    generator = torch.Generator("cpu").manual_seed(seed)
    if "num_frames" in extra:
        frames = pipe(prompt, generator=generator, output_type="np", **SIZE, **extra, **options).frames[0]
        return (frames * 255).astype(np.uint8)
    return np.asarray(pipe(prompt, generator=generator, **SIZE, **extra, **options).images[0])


def ours(engine: Engine, family: str, prompt: str, seed: int) -> np.ndarray:
    _, extra, options = FAMILIES[family]
    from ditserve.config import SamplingParams

    result = engine.run(SamplingParams(prompt=prompt, seed=seed, options=options or None, **SIZE, **extra))
    return np.asarray(result.videos[0] if result.videos else result.images[0])


@pytest.fixture(scope="session")
def engines(folders):
    cache: dict = {}

    def get(family: str) -> Engine:
        if family not in cache:
            cache[family] = Engine.from_pretrained(str(folders[family]), backend="diffusers")
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_generate_equals_diffusers(family, folders, reference, tmp_path, capsys):
    _, extra, options = FAMILIES[family]
    video = "num_frames" in extra
    out = tmp_path / ("frames/" if video else "out.png")
    argv = ["generate", "--model", str(folders[family]), "--backend", "diffusers", "--prompt", "a red fox"]
    argv += ["--seed", "3", "--height", "32", "--width", "32", "--num-inference-steps", "2", "--output", str(out)]
    if video:
        argv += ["--num-frames", str(extra["num_frames"])]
    for name, value in options.items():  # the pipeline's own settings
        argv += ["--option", f"{name}={str(value).lower()}"]
    assert main(argv) == 0
    assert "diffusers backend (no native family serves" in capsys.readouterr().err
    expected = diffusers_output(reference(folders[family]), family, "a red fox", 3)
    if video:
        frames = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])
        assert np.array_equal(frames, expected)
    else:
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_python_api_equals_diffusers_and_names_what_it_cannot_take(family, folders, reference, engines):
    engine = engines(family)
    assert engine.backend == "diffusers" and engine.pipeline.spec.family == type(reference(folders[family])).__name__
    expected = diffusers_output(reference(folders[family]), family, "a boat at sea", 11)
    assert np.array_equal(ours(engine, family, "a boat at sea", 11), expected)
    # A field its __call__ has no parameter for, and a setting of its own with the wrong type, are refused by name.
    unsupported = {"sd3": "true_cfg_scale", "sana": "true_cfg_scale", "ltx-video": "true_cfg_scale"}
    field = unsupported.get(family, "guidance_scale_2")
    with pytest.raises(ConfigError) as info:
        engine.generate("x", **{field: 2.0}, **SIZE)
    assert info.value.field == field and engine.pipeline.spec.family in str(info.value)
    with pytest.raises(ConfigError) as info:
        engine.generate("x", images=[np.zeros((32, 32, 3), np.uint8)], **SIZE)
    assert info.value.field == "images"
    with pytest.raises(ConfigError) as info:
        engine.run(engine.defaults().replace(prompt="x", options={"no_such_setting": 1}))
    assert info.value.field == "options"


def test_unsupported_flag_is_refused_by_the_cli(folders, capsys):
    argv = ["generate", "--model", str(folders["sd3"]), "--prompt", "x", "--true-cfg-scale", "2", *("--seed", "1")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--true-cfg-scale" in err and "StableDiffusion3Pipeline cannot take true_cfg_scale" in err


def test_options_are_typed_by_their_defaults(engines):
    engine = engines("sana")
    with pytest.raises(ConfigError) as info:
        engine.run(engine.defaults().replace(prompt="x", options={"use_resolution_binning": 1}, **SIZE))
    assert info.value.field == "options.use_resolution_binning"


def test_compatible_requests_run_as_one_call(engines):
    """Two one-image requests of one shape: one pipeline call (the transformer runs once per step, not twice), each
    request's picture its own seed's, as alone."""
    engine = engines("sd3")
    forwards = []
    hook = engine.pipeline.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        batch = [engine.defaults().replace(prompt=p, seed=s, **SIZE) for p, s in (("a cat", 1), ("a dog", 2))]
        together = engine.run_batch(batch)
        assert len(forwards) == SIZE["num_inference_steps"]
        alone = [engine.run(params) for params in batch]
    finally:
        hook.remove()
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).mean() <= 1.0
    assert not np.array_equal(np.asarray(together[0].images[0]), np.asarray(together[1].images[0]))
    assert together[0].timings["batch_size"] == 2 and len(together[0].timings["steps"]) == 2


def write_lora(pipe, path: Path, seed: int) -> Path:
    """A random rank-2 LoRA on the transformer's q/k/v, saved in diffusers' format by the pipeline class."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    type(pipe).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_set_merge_unmerge_give_diffusers_results(family, folders, engines, tmp_path):
    import diffusers

    engine = engines(family)
    lora = write_lora(engine.pipeline.pipe, tmp_path / "lora", seed=7)
    base = ours(engine, family, "a lake", 5)
    state = engine.set_lora("style", str(lora), strength=0.7)
    assert state["targets"]["transformer"]["mode"] == "dynamic" and state["loaded"][0]["num_modules"] > 0
    dynamic = ours(engine, family, "a lake", 5)
    engine.merge_lora_weights(strength=0.5)
    merged = ours(engine, family, "a lake", 5)
    engine.unmerge_lora_weights()
    unmerged = ours(engine, family, "a lake", 5)
    engine.set_lora([])  # off again, for the other tests of this engine

    pipe = diffusers.DiffusionPipeline.from_pretrained(folders[family], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    assert np.array_equal(dynamic, diffusers_output(pipe, family, "a lake", 5))
    assert not np.array_equal(dynamic, base)
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["style"])
    assert np.array_equal(merged, diffusers_output(pipe, family, "a lake", 5))
    assert np.array_equal(unmerged, base)  # the weights before the merge, bit for bit, and the adapter off


def test_bad_lora_requests_change_nothing(engines, folders, tmp_path):
    engine = engines("sd3")
    good = write_lora(engine.pipeline.pipe, tmp_path / "good", seed=1)
    # A LoRA for another model: its modules match none of SD3's.
    foreign = write_lora(engines("ltx-video").pipeline.pipe, tmp_path / "foreign", seed=2)
    nan_file = tmp_path / "nan.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(good)
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, nan_file)

    engine.set_lora("good", str(good), strength=0.6)
    before = engine.list_loras()
    picture = ours(engine, "sd3", "a hill", 2)
    bad = [
        ({"lora_nickname": "bad", "lora_path": str(tmp_path / "missing.safetensors")}, "lora_path"),
        ({"lora_nickname": "bad", "lora_path": str(nan_file)}, "lora_path"),
        ({"lora_nickname": ["good", "foreign"], "lora_path": [None, str(foreign)]}, "lora_path"),
        ({"lora_nickname": "good", "strength": 100.0}, "strength"),
        ({"lora_nickname": "good", "target": "transformer_2"}, "target"),
        ({"lora_nickname": "unknown"}, "lora_nickname"),
    ]
    try:
        for kwargs, field in bad:
            with pytest.raises(LoRAError) as info:
                engine.set_lora(**kwargs)
            assert info.value.field == field, (kwargs, info.value)
            assert engine.list_loras() == before
        with pytest.raises(LoRAError):
            engine.merge_lora_weights(strength=float("inf"))
        assert engine.list_loras() == before
        assert np.array_equal(ours(engine, "sd3", "a hill", 2), picture)
    finally:
        engine.set_lora([])


def test_flux_through_the_backend_equals_diffusers_exactly(tiny_dev, diffusers_pipe):
    engine = Engine.from_pretrained(str(tiny_dev), backend="diffusers")
    assert engine.backend == "diffusers" and engine.source.backend_reason.startswith("asked for")
    image = engine.generate("a red fox", seed=4, **SIZE).images[0]
    generator = torch.Generator("cpu").manual_seed(4)
    expected = diffusers_pipe(tiny_dev)("a red fox", generator=generator, **SIZE).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    native = Engine.from_pretrained(str(tiny_dev)).generate("a red fox", seed=4, **SIZE).images[0]
    assert np.abs(np.asarray(native, np.int16) - np.asarray(image, np.int16)).mean() <= 1.0


def test_speed_options_through_diffusers_keep_the_picture(folders, engines):
    """Group offload (--dit-layerwise-offload), VAE slicing and the math attention kernel through diffusers'
    dispatcher give the picture of the plain pipeline."""
    plain = ours(engines("sd3"), "sd3", "a road", 9)
    options = Engine.from_pretrained(
        str(folders["sd3"]), dit_layerwise_offload=True, vae_slicing=True, attention_backend="math"
    )
    assert np.abs(ours(options, "sd3", "a road", 9).astype(np.int16) - plain).mean() <= 1.0


def test_engine_options_refused_by_name(folders, tiny_dev):
    from ditserve.accel.cache_dit import INSTALL_HINT, cache_dit_available

    cases = [
        ({"tp_size": 2, "num_gpus": 2}, folders["sd3"], "tp_size"),
        ({"cfg_parallel": True, "num_gpus": 2}, folders["sd3"], "cfg_parallel"),
        ({"ulysses_degree": 2, "num_gpus": 2}, folders["sd3"], "ulysses_degree"),  # context parallelism: CUDA only
        ({"cache_dit": {}}, tiny_dev, "cache_dit"),  # native: the backend's
        ({"dit_layerwise_offload": True}, tiny_dev, "dit_layerwise_offload"),
    ]
    for kwargs, model, field in cases:
        with pytest.raises(ConfigError) as info:
            Engine.from_pretrained(str(model), device="cpu", **kwargs)
        assert info.value.field == field
    from ditserve.errors import LoaderError

    with pytest.raises(LoaderError, match="no native family serves"):
        Engine.from_pretrained(str(folders["sd3"]), backend="native")
    if not cache_dit_available():
        with pytest.raises(ConfigError, match=INSTALL_HINT):
            Engine.from_pretrained(str(folders["sd3"]), cache_dit={"max_warmup_steps": 1})


def test_served_through_the_openai_client(folders, engines, tmp_path):
    from openai import OpenAI

    from ditserve.server.launch import start_server

    lora = write_lora(engines("sd3").pipeline.pipe, tmp_path / "loras", seed=3)
    server = start_server(
        str(folders["sd3"]),
        "--served-model-name",
        "tiny-sd3",
        "--lora-dir",
        str(lora.parent),
        log_path=str(tmp_path / "log"),
    )
    try:
        assert "diffusers backend (no native family serves StableDiffusion3Pipeline)" in server.log()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["backend"]) for m in models] == [("tiny-sd3", "diffusers")]
        assert server.info()["model"]["backend"] == "diffusers"
        extra = {"num_inference_steps": 2, "seed": 5}

        def served() -> np.ndarray:
            response = client.images.generate(
                prompt="a fox", size="32x32", response_format="b64_json", extra_body=extra
            )
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB"))

        base = served()
        r = httpx.post(
            f"{server.url}/v1/set_lora",
            json={"lora_nickname": "served", "lora_path": lora.name, "strength": 0.8},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        styled = served()
        bad = httpx.post(f"{server.url}/v1/set_lora", json={"lora_nickname": "served", "strength": 99}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "strength"
    finally:
        server.stop()
    engine = engines("sd3")
    assert np.array_equal(base, ours(engine, "sd3", "a fox", 5))
    engine.set_lora("served", str(lora), strength=0.8)
    try:
        assert np.array_equal(styled, ours(engine, "sd3", "a fox", 5))
    finally:
        engine.set_lora([])


def test_bench_times_native_and_the_backend_in_one_run(tiny_dev, tmp_path):
    import json

    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_dev), "--load-format", "auto", "--device", "cpu", "--height", "32"]
    argv += ["--width", "32", "--repeat", "1", "--num-inference-steps", "2", "--no-diffusers", "--json", str(out)]
    assert main([*argv, "--backend", "native,diffusers"]) == 0
    report = json.loads(out.read_text())
    assert report["backends"] == ["native", "diffusers"]
    assert set(report["results"]) == {"ditserve", "ditserve[diffusers]"}
    assert report["results"]["ditserve[diffusers]"]["step_ms"] > 0
    assert report["native_over_diffusers_backend"]["generation"] > 0
    assert main([*argv, "--backend", "native,bogus"]) == 2


def test_cache_dit_steps_when_installed(folders, engines):
    """cache-dit (optional): warm-up over every step computes every step, the plain picture; caching after the
    first step with a threshold nothing stays under changes it."""
    pytest.importorskip("cache_dit")
    steps = {**SIZE, "num_inference_steps": 6}
    plain = engines("sd3").generate("x", seed=1, **steps).images[0]
    warm = {"max_warmup_steps": 6, "fn_compute_blocks": 1, "bn_compute_blocks": 0}
    every = Engine.from_pretrained(str(folders["sd3"]), cache_dit=warm).generate("x", seed=1, **steps).images[0]
    assert np.array_equal(np.asarray(every), np.asarray(plain))
    cached = {**warm, "max_warmup_steps": 1, "residual_diff_threshold": 10.0, "taylorseer": True}
    skipped = Engine.from_pretrained(str(folders["sd3"]), cache_dit=cached).generate("x", seed=1, **steps).images[0]
    assert not np.array_equal(np.asarray(skipped), np.asarray(plain))


@pytest.mark.gpu
def test_context_parallelism_through_diffusers_matches_one_gpu(tiny_dev):
    """--ulysses-degree 2 with the backend: diffusers' context parallelism over two GPUs, the one-GPU picture."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    kwargs = dict(seed=2, height=64, width=64, num_inference_steps=2, output_type="np")
    one = Engine.from_pretrained(str(tiny_dev), backend="diffusers", dtype="float32").generate("x", **kwargs)
    with Engine.from_pretrained(
        str(tiny_dev), backend="diffusers", dtype="float32", num_gpus=2, ulysses_degree=2
    ) as engine:
        two = engine.generate("x", **kwargs)
    assert np.abs(np.asarray(one.images[0]) - np.asarray(two.images[0])).max() < 1e-3
