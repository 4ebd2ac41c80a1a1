"""What a request asks of DiT caching: the method and its settings, validated, as plain data.

Torch-free (the HTTP process and the CLI's parsers read it). The runtime that acts on it is `accel/cache.py`.

Methods (see docs/caching.md):
- `dbcache`: every step computes the first `fn` blocks; when the relative L1 change of their residual since the
  previous step is at most `threshold`, the middle blocks are skipped (their cached residual is added instead)
  and the last `bn` blocks computed.
- `taylorseer`: dbcache's decisions, but a skipped residual is forecast from its history at computed steps
  (finite-difference Taylor series of `taylorseer_order` 1 or 2) instead of reused as is.
- `teacache`: the whole block loop is skipped while the accumulated, polynomially rescaled relative L1 change of
  the first block's timestep-modulated input stays below `threshold`.
- `mask`: a fixed schedule of the steps that compute (`mask` preset or explicit `compute_steps`); the other steps
  skip the middle blocks (between the first `fn` and the last `bn`, both 0 by default: the whole loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ditserve.errors import FieldError

METHODS = ("none", "dbcache", "taylorseer", "teacache", "mask")
# Step-mask presets: (fraction of the steps computed first, then a repeating compute/skip pattern). The last step
# always computes. "none" computes every step.
MASK_PRESETS: dict[str, tuple[float, str]] = {
    "none": (1.0, "1"),
    "slow": (0.2, "110"),
    "medium": (0.15, "10"),
    "fast": (0.1, "100"),
    "ultra": (0.08, "1000"),
}
# Per-method defaults of fn (blocks always computed first) and of threshold.
_DEFAULT_FN = {"dbcache": 1, "taylorseer": 1, "teacache": 0, "mask": 0, "none": 0}
_DEFAULT_THRESHOLD = {"dbcache": 0.08, "taylorseer": 0.08, "teacache": 0.3, "mask": 0.0, "none": 0.0}


class CacheConfigError(FieldError):
    """A cache setting is invalid; `field` is `cache.<setting>`."""


@dataclass(frozen=True)
class CacheConfig:
    """One request's caching. `None` settings take the method's default (`resolved()` fills them)."""

    method: str = "none"
    fn: int | None = None  # blocks always computed at the start of the loop
    bn: int | None = None  # blocks always computed at the end of the loop
    threshold: float | None = None  # dbcache/taylorseer: residual change; teacache: accumulated rescaled change
    max_warmup_steps: int | None = None  # the first steps always compute (default: dbcache 4, teacache 1, mask 0)
    max_cached_steps: int = -1  # at most this many steps skip in a request (-1: no limit)
    max_continuous_cached_steps: int = -1  # at most this many skipping steps in a row (-1: no limit)
    taylorseer_order: int = 1  # 1 or 2
    teacache_coefficients: tuple[float, ...] | None = None  # rescale polynomial, highest power first; None: model's
    mask: str | None = None  # preset name (mask method); default "medium" unless compute_steps is given
    compute_steps: tuple[int, ...] | None = None  # explicit steps that compute (mask method)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CacheConfigError("cache.method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("fn", "bn", "max_warmup_steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= 10_000):
                raise CacheConfigError(f"cache.{name}", f"must be an integer >= 0, got {value!r}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < -1:
                raise CacheConfigError(f"cache.{name}", f"must be an integer >= 0, or -1 for no limit; got {value!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1e6):
            raise CacheConfigError("cache.threshold", f"must be a finite number >= 0, got {t!r}")
        if not _is_int(self.taylorseer_order) or self.taylorseer_order not in (1, 2):
            raise CacheConfigError("cache.taylorseer_order", f"must be 1 or 2, got {self.taylorseer_order!r}")
        c = self.teacache_coefficients
        if c is not None and (
            not isinstance(c, tuple | list)
            or not 1 <= len(c) <= 10
            or not all(not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) for x in c)
        ):
            raise CacheConfigError(
                "cache.teacache_coefficients", f"must be 1 to 10 finite numbers (highest power first), got {c!r}"
            )
        if self.mask is not None and self.mask not in MASK_PRESETS:
            raise CacheConfigError("cache.mask", f"{self.mask!r} is not one of {', '.join(MASK_PRESETS)}")
        steps = self.compute_steps
        if steps is not None:
            if not isinstance(steps, tuple | list) or not steps or not all(_is_int(s) and s >= 0 for s in steps):
                raise CacheConfigError(
                    "cache.compute_steps", f"must be a non-empty list of step indices, got {steps!r}"
                )
            if self.mask is not None:
                raise CacheConfigError("cache.compute_steps", "give either a mask preset or compute_steps, not both")
        if self.method != "mask" and (self.mask is not None or steps is not None):
            field = "cache.mask" if self.mask is not None else "cache.compute_steps"
            raise CacheConfigError(field, f"is a setting of the mask method, not of {self.method}")
        if self.method not in ("dbcache", "taylorseer") and self.taylorseer_order != 1:
            raise CacheConfigError("cache.taylorseer_order", f"is a setting of taylorseer, not of {self.method}")
        if self.method != "teacache" and c is not None:
            raise CacheConfigError("cache.teacache_coefficients", f"is a setting of teacache, not of {self.method}")
        if self.method in ("dbcache", "taylorseer") and self.fn == 0:
            raise CacheConfigError("cache.fn", f"{self.method} compares the first fn blocks' residual: fn must be >= 1")
        if self.method == "teacache" and (self.fn or self.bn):
            raise CacheConfigError("cache.fn" if self.fn else "cache.bn", "teacache skips the whole block loop")

    def resolved(self) -> CacheConfig:
        """Every default filled in for the method."""
        self.validate()
        m = self.method
        return dataclasses.replace(
            self,
            fn=_DEFAULT_FN[m] if self.fn is None else self.fn,
            bn=0 if self.bn is None else self.bn,
            threshold=_DEFAULT_THRESHOLD[m] if self.threshold is None else float(self.threshold),
            max_warmup_steps=(
                {"dbcache": 4, "taylorseer": 4, "teacache": 1}.get(m, 0)
                if self.max_warmup_steps is None
                else self.max_warmup_steps
            ),
            mask="medium" if m == "mask" and self.mask is None and self.compute_steps is None else self.mask,
            teacache_coefficients=None if self.teacache_coefficients is None else tuple(self.teacache_coefficients),
            compute_steps=None if self.compute_steps is None else tuple(self.compute_steps),
        )

    def check_blocks(self, num_blocks: int) -> None:
        """Refuse fn + bn that leave no block to skip in a loop of `num_blocks`."""
        fn, bn = self.fn or 0, self.bn or 0
        if self.enabled and fn + bn >= num_blocks:
            raise CacheConfigError(
                "cache.fn", f"fn {fn} + bn {bn} leaves none of the model's {num_blocks} blocks to skip"
            )

    def to_dict(self) -> dict:
        """Plain JSON data, without unset settings."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value is not None and value != f.default) or f.name == "method":
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def key(self) -> str:
        """The settings as one hashable value (requests with equal keys can share a batch)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict | None) -> CacheConfig:
        """From JSON data (a request's `cache` object, a --cache-config file); unknown keys are refused."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise CacheConfigError("cache", f"must be an object of cache settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CacheConfigError(f"cache.{unknown[0]}", f"unknown setting (settings: {', '.join(sorted(known))})")
        values = dict(data)
        for name in ("teacache_coefficients", "compute_steps"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def coerce(cls, value: CacheConfig | dict | str | None) -> CacheConfig:
        """A CacheConfig from what a request or a flag may carry: a config, its dict, a method name, or None (off)."""
        if isinstance(value, CacheConfig):
            value.validate()
            return value
        if isinstance(value, str):
            config = cls(method=value)
            config.validate()
            return config
        return cls.from_dict(value)

    @classmethod
    def from_file(cls, path: str | Path) -> CacheConfig:
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except OSError as e:
            raise CacheConfigError("cache_config", f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CacheConfigError("cache_config", f"{path} is not JSON: {e}") from None
        return cls.from_dict(data)


def mask_compute_steps(preset: str, num_steps: int) -> list[bool]:
    """Which of `num_steps` steps compute under a mask preset."""
    first_fraction, pattern = MASK_PRESETS[preset]
    warm = max(1, round(first_fraction * num_steps))
    out = [i < warm or pattern[(i - warm) % len(pattern)] == "1" for i in range(num_steps)]
    out[-1] = True
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
