"""The cache-dit library's step caching (DBCache, with TaylorSeer when asked) on a diffusers pipeline: the diffusers
backend's `--cache-dit`.

cache-dit is an optional dependency (`pip install cache-dit`); without it `--cache-dit` is refused with that hint.
Its settings come from our flags (`config.CacheDiTSettings`), over a cache-dit YAML file's `cache_config` section
when `--cache-dit-config` names one; parallelism, attention and quantization are ours to set (their sections of the
file are refused).
"""

from __future__ import annotations

import importlib.util

from ditserve.config import CacheDiTSettings, ConfigError

INSTALL_HINT = "the cache-dit library is not installed: pip install cache-dit"


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def cache_dit_configs(settings: CacheDiTSettings) -> dict:
    """cache-dit's config dictionary (the file's sections, our settings over its `cache_config`)."""
    config: dict = {}
    if settings.config_file is not None:
        import yaml

        try:
            with open(settings.config_file) as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError("cache_dit_config", f"{settings.config_file}: not a readable YAML file ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError("cache_dit_config", f"{settings.config_file}: not a YAML mapping")
        others = sorted(set(loaded) - {"cache_config"})
        if "cache_config" not in loaded or others:
            raise ConfigError(
                "cache_dit_config",
                f"{settings.config_file}: give a cache_config section only (found {', '.join(sorted(loaded))}); "
                "parallelism and attention are set with ditserve's flags",
            )
        config = {"cache_config": dict(loaded["cache_config"] or {})}
    config.setdefault("cache_config", {}).update(settings.cache_config())
    return config


def enable_cache_dit(pipe, settings: CacheDiTSettings) -> None:
    """cache-dit's hooks on the pipeline's denoiser, with `settings`."""
    if not cache_dit_available():
        raise ConfigError("cache_dit", INSTALL_HINT)
    import cache_dit

    try:
        loaded = cache_dit.load_configs(cache_dit_configs(settings))
        cache_dit.enable_cache(pipe, cache_config=loaded["cache_config"], calibrator_config=loaded["calibrator_config"])
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ConfigError("cache_dit", f"cache-dit refused the settings or this pipeline ({e})") from None
