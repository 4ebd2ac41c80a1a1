"""Resolving what the user named (a folder, a preset, a built-in model) and loading its components.

Only the DiT is ours: it is built on the meta device and filled from the folder's safetensors through the model's
key map. Text encoders and tokenizers come from transformers, the VAE and scheduler from diffusers, each from its
own subfolder exactly as diffusers would load them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditserve.config import DEFAULTED_FIELDS
from ditserve.loader.weights import (
    LoaderError,
    build_on_meta,
    checkpoint_files,
    checkpoint_names,
    default_dtype,
    init_dummy_weights,
    iter_checkpoint,
    load_checkpoint,
    materialize,
)
from ditserve.registry import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    DIFFUSERS_BACKEND_SPEC,
    ModelSpec,
    choose_backend,
    get_preset,
    load_object,
    preset_names,
    spec_for_pipeline_class,
    supported_pipeline_classes,
)

SAMPLING_DEFAULTS_FILE = "ditserve.json"


@dataclass
class ModelSource:
    """Where a model's configs (and maybe weights) come from: a folder, or a preset's configs alone."""

    name: str
    spec: ModelSpec
    folder: Path | None = None
    preset_configs: dict[str, dict] = field(default_factory=dict)
    preset_pipeline_config: dict[str, Any] = field(default_factory=dict)
    backend: str = "native"  # "native" (the family's pipeline) or "diffusers" (the diffusers backend)
    backend_reason: str = ""  # why that backend: printed at start

    def describe_backend(self) -> str:
        """One line for the user: which backend runs the model, and why."""
        return f"{self.name}: {self.backend} backend ({self.backend_reason})"

    def model_index(self) -> dict:
        """The folder's model_index.json (a preset's: the spec's components with its pipeline config)."""
        if self.folder is None:
            return {**self.spec.model_index(self.spec.pipeline_classes[0]), **self.preset_pipeline_config}
        try:
            return json.loads((self.folder / "model_index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LoaderError(f"{self.folder / 'model_index.json'}: unreadable ({e})") from None

    def has(self, component: str) -> bool:
        """Whether this model has the component: a required one always; an optional one when the folder holds it
        (and model_index.json does not name it null) or the preset configures it."""
        if component not in self.spec.optional_components:
            return True
        if self.folder is None:
            return component in self.preset_configs
        entry = self.model_index().get(component)
        named = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
        return named and (self.folder / component).is_dir()

    @property
    def dits(self) -> tuple:
        """The family's DiTs (`DiTSpec`s) that this model has."""
        return tuple(d for d in self.spec.dits if self.has(d.component))

    def pipeline_config(self) -> dict[str, Any]:
        """model_index.json's settings beside the components (not its `_` metadata)."""
        index = self.model_index()
        return {k: v for k, v in index.items() if not k.startswith("_") and k not in self.spec.components}

    def config(self, component: str) -> dict:
        """The component's config.json (or scheduler_config.json); for a DiT whose class reads its checkpoint's
        names too (`config_from_checkpoint`: layers that only the names tell of), with what they add."""
        if self.folder is None:
            return dict(self.preset_configs[component])
        sub = self.folder / component
        for filename in ("config.json", "scheduler_config.json"):
            if (sub / filename).is_file():
                try:
                    config = json.loads((sub / filename).read_text())
                except json.JSONDecodeError as e:
                    raise LoaderError(f"{sub / filename}: invalid JSON ({e})") from None
                for dit in self.spec.dits:
                    if dit.component != component:
                        continue
                    adapt = getattr(load_object(dit.model), "config_from_checkpoint", None)
                    if adapt is not None:
                        config = adapt(config, checkpoint_names(sub))
                return config
        raise LoaderError(f"{sub}: no config.json")

    def sampling_defaults(self) -> dict:
        """Sampling settings the folder's `ditserve.json` asks for in place of the pipeline's defaults.

        For models trained at one size and sequence length (the built-in digits model): diffusers' defaults
        (e.g. 128 × vae_scale_factor pixels, 512 T5 tokens) would ask them for something they never saw. A
        default `negative_prompt` with `true_cfg_scale` > 1 turns on true CFG for requests that name neither.
        """
        if self.folder is None or not (self.folder / SAMPLING_DEFAULTS_FILE).is_file():
            return {}
        path = self.folder / SAMPLING_DEFAULTS_FILE
        try:
            values = json.loads(path.read_text()).get("sampling_defaults", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise LoaderError(f"{path}: invalid JSON object ({e})") from None
        unknown = set(values) - set(DEFAULTED_FIELDS)  # what ditserve.json may set
        if unknown:
            raise LoaderError(f"{path}: unknown sampling defaults {sorted(unknown)}; known: {DEFAULTED_FIELDS}")
        if not isinstance(values.get("negative_prompt", ""), str):
            raise LoaderError(f"{path}: the default negative_prompt must be a string")
        return dict(values)

    def teacache_coefficients(self) -> tuple[float, ...] | None:
        """TeaCache's rescale polynomial fitted for this checkpoint (`ditserve.json`'s `teacache_coefficients`,
        written by `python -m ditserve.accel.teacache_fit`), or None."""
        if self.folder is None or not (self.folder / SAMPLING_DEFAULTS_FILE).is_file():
            return None
        path = self.folder / SAMPLING_DEFAULTS_FILE
        try:
            values = json.loads(path.read_text()).get("teacache_coefficients")
        except (json.JSONDecodeError, AttributeError) as e:
            raise LoaderError(f"{path}: invalid JSON object ({e})") from None
        if values is None:
            return None
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values) or not values:
            raise LoaderError(f"{path}: teacache_coefficients must be a list of numbers (highest power first)")
        return tuple(float(v) for v in values)


def resolve_model(model: str | None, load_format: str = "auto", backend: str = "auto") -> ModelSource:
    """Turn a --model value into a ModelSource, with an error that says what to do when it can't. `backend`
    (registry.BACKENDS) chooses between the native family serving the folder's pipeline class and the diffusers
    backend."""
    name = model or DEFAULT_MODEL
    if name in BUILTIN_MODELS and not Path(name).exists():
        return _folder_source(_builtin_model_path(name), name, backend)
    if name in preset_names() and not Path(name).exists():
        spec, preset = get_preset(name)
        if load_format != "dummy":
            raise LoaderError(
                f"{name!r} is a preset: it holds the real configs but no weights. Pass load_format='dummy' "
                "(--load-format dummy) for random weights at full size, or give the path of a downloaded folder."
            )
        source = ModelSource(
            name=name, spec=spec, preset_configs=preset.configs, preset_pipeline_config=preset.pipeline_config
        )
        return _with_backend(source, preset.pipeline_class, backend)
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join([*BUILTIN_MODELS, *preset_names()])
        raise LoaderError(f"model {name!r}: no such folder, and not a known model name ({known})")
    if not path.is_dir():
        raise LoaderError(f"model {name!r}: not a folder (expected a diffusers model folder with model_index.json)")
    return _folder_source(path, name, backend)


def _builtin_model_path(name: str) -> Path:
    if name in ("digits", "digits-video"):
        from ditserve.digits import model_path, video_model_path

        try:
            return model_path() if name == "digits" else video_model_path()
        except FileNotFoundError as e:
            raise LoaderError(str(e)) from None
    from ditserve.tiny import builtin_model_path

    return builtin_model_path(name)


def _folder_source(path: Path, name: str, backend: str = "auto") -> ModelSource:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise LoaderError(f"{path}: no model_index.json; is this a diffusers model folder?")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise LoaderError(f"{index_file}: invalid JSON ({e})") from None
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise LoaderError(f"{index_file}: no pipeline class (_class_name)")
    spec = spec_for_pipeline_class(class_name)
    if spec is None and backend == "native":
        supported = ", ".join(supported_pipeline_classes())
        raise LoaderError(
            f"{index_file}: no native family serves pipeline class {class_name!r} (native: {supported}); "
            "--backend diffusers or auto runs it through diffusers"
        )
    source = _with_backend(ModelSource(name=name, spec=spec, folder=path), class_name, backend)  # type: ignore[arg-type]
    spec = source.spec
    missing = [c for c in spec.components if c not in spec.optional_components and not (path / c).is_dir()]
    if missing:
        raise LoaderError(f"{path}: missing component folder(s) {', '.join(missing)} needed by {class_name}")
    return source


def _with_backend(source: ModelSource, class_name: str, backend: str) -> ModelSource:
    """The source with the backend `backend` asks for: the native family's spec as it is, or the diffusers backend's
    spec for the class (built from the native family's components for a preset, from model_index.json for a
    folder)."""
    try:
        chosen = choose_backend(class_name, backend)
    except ValueError as e:
        raise LoaderError(str(e)) from None
    if chosen == "native":
        source.backend_reason = f"the native {source.spec.family} family serves {class_name}"
        if backend == "native":
            source.backend_reason = f"asked for; {source.backend_reason}"
        return source
    native = source.spec
    if source.folder is None:
        components = dict(native.components)
        optional = native.optional_components
        code_tokenizers = dict(native.code_tokenizers)
    else:
        components = {
            key: tuple(value)
            for key, value in source.model_index().items()
            if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None
        }
        optional, code_tokenizers = (), {}
    source.spec = load_object(DIFFUSERS_BACKEND_SPEC)(class_name, components, optional, code_tokenizers)
    source.backend = "diffusers"
    if native is None:
        source.backend_reason = f"no native family serves {class_name}"
    else:
        source.backend_reason = f"asked for; the native {native.family} family serves {class_name} too"
    return source


def load_components(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int = 0,
    host_components: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Every component the family's spec names, by component name: our DiTs, the libraries' encoders, VAE,
    tokenizers and scheduler. Dummy weights are seeded `seed`, `seed + 1`, ... in the spec's order of models.
    `host_components` load into host memory instead of `device` (they are offloaded: accel/offload.py)."""
    spec = source.spec
    cpu = torch.device("cpu")
    dits = {d.component: d for d in spec.dits}
    loaded: dict[str, Any] = {}
    model_index = 0
    for name, (library, class_name) in spec.components.items():
        if not source.has(name):
            loaded[name] = None
            continue
        if name in dits:
            cls, key_map = load_object(dits[name].model), load_object(dits[name].key_map)
            config = source.config(name)
            factory = functools.partial(cls.from_config, config)
            where = cpu if name in host_components else device
            loaded[name] = load_dit(source, name, factory, key_map, where, dtype, load_format, seed + model_index)
            model_index += 1
            continue
        cls = library_class(library, class_name)
        # Tokenizers and image processors: no weights, files of their own (or built in code for presets).
        if name in spec.code_tokenizers or class_name.endswith(("Tokenizer", "TokenizerFast", "Processor")):
            fallback = spec.code_tokenizers.get(name)
            loaded[name] = load_tokenizer(source, name, cls, load_object(fallback) if fallback else None)
        elif hasattr(cls, "set_timesteps"):  # a scheduler: configured, no weights
            loaded[name] = cls.from_config(source.config(name))
        else:
            config_cls = getattr(cls, "config_class", None) if library == "transformers" else None
            where = cpu if name in host_components else device
            loaded[name] = load_library_model(
                source, name, cls, where, dtype, load_format, seed + model_index, config_cls
            )
            model_index += 1
    return loaded


def library_class(library: str, class_name: str):
    """diffusers' or transformers' class of that name (imported alone: both packages load their modules lazily)."""
    if library not in ("diffusers", "transformers"):
        raise LoaderError(f"component library {library!r} is not supported (diffusers, transformers)")
    try:
        return getattr(importlib.import_module(library), class_name)
    except AttributeError:
        raise LoaderError(f"{library} has no class {class_name!r}") from None


def load_dit(
    source: ModelSource,
    component: str,
    factory,
    key_map,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int = 0,
) -> nn.Module:
    """Build our DiT on meta, give it storage on `device`, then fill it from the checkpoint (or randomly)."""
    model = materialize(build_on_meta(factory, dtype), device)
    if load_format == "dummy":
        init_dummy_weights(model, seed=seed)
    else:
        folder = source.folder / component  # type: ignore[operator]
        load_checkpoint(model, iter_checkpoint(checkpoint_files(folder)), key_map, where=str(folder))
    return model.eval()


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Seed torch's RNG for a block and restore it after, so dummy weights are the same in every run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def load_library_model(
    source: ModelSource,
    component: str,
    model_cls,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int = 0,
    config_cls=None,
) -> nn.Module:
    """A text encoder (transformers: pass its `config_cls`) or VAE (diffusers): from the folder, or random weights
    at the configured size."""
    if load_format == "dummy":
        raw = source.config(component)
        # Built on the device with the library's own weight init skipped (on the host it draws every value twice,
        # minutes for a 5.7B-parameter text encoder), then filled by our init. Buffers the constructor computes
        # (rotary frequencies, position ids) are kept.
        with seeded(device, seed), torch.device(device), default_dtype(dtype), library_init_skipped(model_cls):
            model = construct_library_model(model_cls, raw, config_cls)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # transformers ties shared embeddings in the init it skipped
        model = model.to(dtype)
        init_dummy_weights(model, seed=seed)
        return model.eval()
    try:
        model = model_cls.from_pretrained(source.folder / component, dtype=dtype)
    except (OSError, ValueError) as e:
        raise LoaderError(f"{source.folder / component}: cannot load {model_cls.__name__} ({e})") from None
    return model.to(device).eval()


def construct_library_model(model_cls, raw: dict, config_cls=None) -> nn.Module:
    """A transformers (given its `config_cls`) or diffusers model built from its config.json's contents, on the
    current default device, with whatever init the caller's context leaves it."""
    if config_cls is not None:
        return model_cls(config_cls.from_dict(raw))
    return model_cls.from_config({k: v for k, v in raw.items() if not k.startswith("_")})


def library_init_skipped(model_cls):
    """The context in which transformers or diffusers build `model_cls` without initialising its weights."""
    if model_cls.__module__.startswith("transformers"):
        from transformers.initialization import no_init_weights
    elif model_cls.__module__.startswith("diffusers"):
        from diffusers.models.modeling_utils import no_init_weights
    else:
        return contextlib.nullcontext()
    return no_init_weights()


def load_tokenizer(source: ModelSource, component: str, tokenizer_cls, fallback=None):
    """A tokenizer (or image processor) from the folder; for presets (no files) one built in code with the same
    settings."""
    if source.folder is not None and (source.folder / component).is_dir():
        try:
            return tokenizer_cls.from_pretrained(source.folder / component)
        except (OSError, ValueError) as e:
            raise LoaderError(f"{source.folder / component}: cannot load {tokenizer_cls.__name__} ({e})") from None
    if fallback is None:
        raise LoaderError(f"{source.name}: no {component} folder and no tokenizer built in code for it")
    return fallback()
