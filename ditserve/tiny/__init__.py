"""Tiny random models in diffusers layout, written entirely in code (no downloads), one module per family.

They serve the tests (ditserve and diffusers load the same folder), `ditserve make-tiny`, and the built-in random
models (`tiny-flux`), which are written once into the user's cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_FORMAT_VERSION = 1  # bump when a built-in tiny model changes, so caches are rebuilt


def cache_dir() -> Path:
    root = os.environ.get("DITSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ditserve"
    )
    return Path(root)


def builtin_model_path(name: str) -> Path:
    """The folder of a built-in model, written on first use (atomically, so concurrent first uses are safe)."""
    if name != "tiny-flux":
        raise KeyError(f"unknown built-in model {name!r}")
    target = cache_dir() / f"tiny-flux-v{TINY_FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-flux-", dir=target.parent))
    try:
        from ditserve.tiny.flux import make_tiny_flux

        make_tiny_flux(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
