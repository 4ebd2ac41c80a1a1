"""The LoRA flags of `ditserve generate` (and `serve`): parsing, early checks, and applying them to an engine.

Kept here so that the CLI module only gains two calls per subcommand:
    add_lora_flags(parser)               # when building the subcommand
    apply_lora_flags(engine, namespace)  # after the engine is loaded
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

FLAGS = {"lora_path": "--lora-path", "lora_nickname": "--lora-nickname", "strength": "--lora-scale"}


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora-path",
        action="append",
        default=[],
        metavar="PATH",
        help="LoRA .safetensors file or PEFT folder (repeatable: several adapters at once)",
    )
    p.add_argument(
        "--lora-nickname",
        action="append",
        default=[],
        metavar="NAME",
        help="name for each --lora-path, in order (default: the file name without extension)",
    )
    p.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="strength of each LoRA, in order; one value applies to all (default 1.0)",
    )


def lora_request(ns: argparse.Namespace) -> dict | None:
    """The flags as `Engine.set_lora` keyword arguments, checked before the (slow) model load; None without LoRA."""
    from ditserve.cli import UsageError

    paths, names, scales = list(ns.lora_path), list(ns.lora_nickname), list(ns.lora_scale)
    if not paths:
        if names or scales:
            raise UsageError("ditserve: --lora-nickname/--lora-scale: give --lora-path for each LoRA")
        return None
    for p in paths:
        if not Path(p).expanduser().exists():
            raise UsageError(f"ditserve: --lora-path: {p}: no such file or folder")
    if names and len(names) != len(paths):
        raise UsageError(f"ditserve: --lora-nickname: {len(names)} nicknames for {len(paths)} --lora-path values")
    if not names:
        names = [Path(p).name.removesuffix(".safetensors") for p in paths]
        if len(set(names)) != len(names):
            raise UsageError("ditserve: --lora-nickname: two LoRA files have the same name; give each a nickname")
    if len(scales) > 1 and len(scales) != len(paths):
        raise UsageError(f"ditserve: --lora-scale: {len(scales)} values for {len(paths)} --lora-path values")
    if any(not math.isfinite(s) for s in scales):
        raise UsageError("ditserve: --lora-scale: must be a finite number")
    strength = scales if len(scales) > 1 else (scales[0] if scales else 1.0)
    return {"lora_nickname": names, "lora_path": paths, "strength": strength}


def apply_lora_flags(engine, ns: argparse.Namespace) -> dict | None:
    """Load and activate the flags' LoRAs on `engine`; a LoRA problem becomes a one-line usage error naming the
    flag. Returns the engine's list_loras() state, or None when no LoRA was asked for."""
    from ditserve.cli import UsageError
    from ditserve.lora import LoRAError

    request = lora_request(ns)
    if request is None:
        return None
    try:
        return engine.set_lora(**request)
    except LoRAError as e:
        flag = FLAGS.get(e.field, "--" + e.field.replace("_", "-"))
        raise UsageError(f"ditserve: {flag}: {str(e).split(': ', 1)[1]}") from None
