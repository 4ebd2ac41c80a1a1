"""Model families, each described once: which folders a family serves and what it is made of.

A folder's `model_index.json` names its pipeline class (`_class_name`); the family whose `ModelSpec` lists that class
serves it. The engine, worker, server, loader, LoRA, bench and make-tiny read the spec and never name a family. The
registrations themselves live in `ditserve/families/`, one module per family, named in `FAMILY_MODULES`.

Everything here is plain data: no torch is imported, so the HTTP process and `--help` stay light. Code is named by
"module:attribute" strings that `load_object` imports when it is needed.
"""

from __future__ import annotations

import copy
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any

FAMILY_MODULES = ("flux", "zimage", "wan", "flux2", "flux2_klein")

# The model `generate` and `serve` use when no --model is given: "digits", a tiny FLUX.1 trained on handwritten
# digits, shipped inside the package (ditserve/assets/digits-flux, written by `python -m ditserve.digits.train`).
# "tiny-flux" is a tiny FLUX.1 with random weights, written once into the user's cache by `ditserve.tiny`
# (deterministic: the same weights on every machine).
DEFAULT_MODEL = "digits"
BUILTIN_MODELS = ("digits", "tiny-flux")
DEFAULT_BENCH_MODEL = "flux.1-dev"  # the preset `ditserve bench` times when no --model is given

# Who runs a folder: "native" (the family serving its `_class_name`, with our DiT), "diffusers" (any diffusers
# pipeline, run by diffusers itself behind the same seam: pipelines/diffusers_backend.py), or "auto" (native when a
# family serves the class, diffusers otherwise).
BACKENDS = ("auto", "native", "diffusers")
# "module:function" building the diffusers backend's ModelSpec for a pipeline class (it inspects the class).
DIFFUSERS_BACKEND_SPEC = "ditserve.pipelines.diffusers_backend:backend_spec"
# Tiny random folders of pipelines only the diffusers backend serves: `ditserve make-tiny NAME` → "module:function".
BACKEND_TINY_MODELS = {
    "sd3": "ditserve.tiny.backend:make_tiny_sd3",
    "sana": "ditserve.tiny.backend:make_tiny_sana",
    "ltx-video": "ditserve.tiny.backend:make_tiny_ltx_video",
    "hunyuan-video": "ditserve.tiny.backend:make_tiny_hunyuan_video",
}


@dataclass(frozen=True)
class DiTSpec:
    """One native DiT of a family: its component folder, our model class and the key map from diffusers' names.

    The class is built with `Class.from_config(config.json contents)`, and `Class.attention_heads(config)` says how
    many heads tensor and Ulysses parallelism split (checked before any rank starts); the key map takes a diffusers parameter name
    and gives (our parameter name, shard index inside a fused layer or None), or None for a name it does not know."""

    component: str
    model: str
    key_map: str


@dataclass
class Preset:
    """Configs of a published model, as its diffusers folder has them (component → config.json contents), so that
    `load_format="dummy"` builds the real architecture at full size without any files."""

    name: str
    pipeline_class: str
    configs: dict[str, dict] = field(default_factory=dict)
    # model_index.json's own settings beside the components (e.g. the step at which a second expert takes over).
    pipeline_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the shared code needs to know about one model family."""

    family: str
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this family serves
    # Every component folder the family needs: name → (library, class), as model_index.json writes them. Models
    # are listed in the order their dummy weights are seeded.
    components: dict[str, tuple[str, str]]
    dits: tuple[DiTSpec, ...]  # the components that are ours
    pipeline: str  # "module:Class" of the Pipeline subclass
    # Components a folder of the family may lack (model_index.json names them null, or there is no such folder, or
    # a preset configures none): they load as None, and a DiT among them is left out of `Pipeline.transformers()`.
    optional_components: tuple[str, ...] = ()
    # Tokenizer components → "module:function" building a tokenizer in code, for presets (which have no files).
    code_tokenizers: dict[str, str] = field(default_factory=dict)
    lora_architecture: str | None = None  # the LoRA naming schemes' architecture (lora/naming.py); None: no LoRA
    output: str = "image"  # "image" or "video"
    # What the server may route to it: "text-to-image", "image-edit", "text-to-video", "image-to-video".
    tasks: tuple[str, ...] = ("text-to-image",)
    image_inputs: int = 0  # how many input images a request may bring (edit and image-to-video families)
    # diffusers' pipeline __call__ defaults, except the size (the pipeline derives it from the VAE).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int = 512  # the longest text sequence the family's encoder is used with
    # Settings of the family's own that a request may set in `SamplingParams.options`: name → default.
    sampling_options: dict[str, Any] = field(default_factory=dict)
    # Named ways of sampling a request may pick (`SamplingParams.sampling_preset`), e.g. a few-step distillation
    # LoRA's: name → SamplingParams fields (and `options`) that fill what the request leaves unset.
    sampling_presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    presets: tuple[Preset, ...] = ()
    # "module:function" writing a tiny random folder of this family: function(path, **options) → path, with
    # `make_tiny_options` naming the options `ditserve make-tiny` offers (flag → help).
    make_tiny: str | None = None
    make_tiny_options: dict[str, str] = field(default_factory=dict)

    def model_index(self, pipeline_class: str) -> dict:
        index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
        index.update({name: list(lib_cls) for name, lib_cls in self.components.items()})
        return index


def load_object(path: str) -> Any:
    """The attribute named by "module:attribute"."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@functools.cache
def specs() -> tuple[ModelSpec, ...]:
    return tuple(importlib.import_module(f"ditserve.families.{name}").SPEC for name in FAMILY_MODULES)


def spec_for_family(family: str) -> ModelSpec:
    for spec in specs():
        if spec.family == family:
            return spec
    raise KeyError(f"unknown model family {family!r}; known: {', '.join(s.family for s in specs())}")


def spec_for_pipeline_class(class_name: str) -> ModelSpec | None:
    """The family serving folders whose model_index.json names `class_name`, or None."""
    return next((s for s in specs() if class_name in s.pipeline_classes), None)


def choose_backend(class_name: str, backend: str) -> str:
    """ "native" or "diffusers" for a folder of this pipeline class and a --backend value; ValueError (the message
    for the user) when native is asked for a class no family serves."""
    if backend not in BACKENDS:
        raise ValueError(f"{backend!r} is not one of {', '.join(BACKENDS)}")
    native = spec_for_pipeline_class(class_name) is not None
    if backend == "native" and not native:
        raise ValueError(
            f"no native family serves {class_name} (native: {', '.join(supported_pipeline_classes())}); "
            "use --backend diffusers or auto"
        )
    return "native" if native and backend != "diffusers" else "diffusers"


def supported_pipeline_classes() -> list[str]:
    return sorted(c for s in specs() for c in s.pipeline_classes)


def preset_names() -> list[str]:
    return sorted(p.name for s in specs() for p in s.presets)


def get_preset(name: str) -> tuple[ModelSpec, Preset]:
    """A preset by name with its family's spec (the preset a copy: callers may change it)."""
    for spec in specs():
        for preset in spec.presets:
            if preset.name == name:
                return spec, copy.deepcopy(preset)
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
