"""What the `ditserve` commands share: the usage error and its parser, the engine and LoRA flags and their
conversion to engine arguments, and quieting the libraries' own output.

A leaf module: it imports none of the modules that make up the commands (`ditserve.cli`, the server's commands,
bench, the worker), so each of them imports it without importing the others back.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

from ditserve.config import ATTENTION_BACKENDS, LOAD_FORMATS


class UsageError(Exception):
    """A user error; the message is shown as is."""


class CliParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def field_to_flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def quiet_libraries() -> None:
    """Keep the terminal to our progress bar and summary: the libraries' own bars and notices are noise here."""
    warnings.filterwarnings("ignore")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


# ---- engine flags: each named after its EngineArgs field --------------------------------------------------------
def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="diffusers model folder, preset name, or built-in: digits (the default), digits-video, tiny-flux",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help="dummy = random weights, real sizes")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (slow first request)")
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode large images in overlapping tiles (as diffusers' enable_tiling); spread over the GPUs",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay the DiT forward as a CUDA graph per image size (CUDA only; on by default)",
    )
    par = p.add_argument_group("several GPUs (on the CPU: processes); num-gpus = ulysses × ring × cfg × tp")
    par.add_argument("--num-gpus", type=int, default=1)
    par.add_argument("--ulysses-degree", type=int, default=1, help="sequence parallel: all-to-all over heads")
    par.add_argument("--ring-degree", type=int, default=1, help="sequence parallel: K/V passed around a ring")
    par.add_argument("--cfg-parallel", action="store_true", help="true-CFG branches on two halves of the ranks")
    par.add_argument("--tp-size", type=int, default=1, help="tensor parallel: linears sharded across ranks")
    par.add_argument(
        "--tp-all-reduce",
        default="nccl",
        help="how tensor-parallel partial sums are added: nccl (default) or two-shot (symmetric memory over NVLink; "
        "a little faster on 2 GPUs at 1024²)",
    )
    par.add_argument(
        "--ulysses-exchange",
        default="auto",
        help="how Ulysses's all-to-alls move: copy-engine (symmetric memory, copied by the GPUs' copy engines, "
        "leaving every SM to the work beside it; one node), nccl, or auto (default: copy-engine on one node's GPUs "
        "with CUDA graphs, also beside Ring, tensor or CFG parallelism; else nccl)",
    )
    par.add_argument("--nnodes", type=int, default=1)
    par.add_argument("--node-rank", type=int, default=0)
    par.add_argument("--dist-init-addr", default=None, help="host:port of node 0 (several nodes)")


def engine_args_from(ns: argparse.Namespace):
    """The EngineArgs the parsed engine flags describe (validated); fields with no flag keep their default."""
    import dataclasses

    from ditserve.config import EngineArgs

    names = [f.name for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)]
    return EngineArgs(**{name: getattr(ns, name) for name in names})


# ---- LoRA flags (generate and serve) ----------------------------------------------------------------------------
# LoRAError's fields → the flags that set them.
LORA_FLAGS = {"lora_path": "--lora-path", "lora_nickname": "--lora-nickname", "strength": "--lora-scale"}


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
    from ditserve.lora import LoRAError

    request = lora_request(ns)
    if request is None:
        return None
    try:
        return engine.set_lora(**request)
    except LoRAError as e:
        flag = LORA_FLAGS.get(e.field, field_to_flag(e.field))
        raise UsageError(f"ditserve: {flag}: {e.message}") from None
