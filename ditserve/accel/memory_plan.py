"""What stays on the device: the offloads a memory budget (or a video model's size) calls for.

`component_sizes` measures every component by building it on the meta device (no memory, no weights read); `plan`
picks, among the combinations of component offloads and layerwise DiT offload the settings leave open, the cheapest
one whose estimate fits the budget. Cost is bytes copied per request: an offloaded component once per request, the
DiT's blocks once per forward (so every component offload is tried before layerwise offload). The estimate is what
is resident (components not offloaded, each DiT's parts outside its blocks and the ring of block slots, or the whole
DiT) plus the larger of the largest offloaded component (while it runs) and the room for the denoising loop's
activations (`ACTIVATION_ROOM_GIB`): the two are not on the device at the same time. Under CUDA graphs the
activations stay in the graphs' memory pool between forwards, so there they are added, not the larger taken.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from ditserve.accel.offload import DEFAULT_PREFETCH, _layout, _module_tensors, tensor_bytes
from ditserve.config import ConfigError, EngineArgs

GIB = 2**30

# Device memory kept free for a request's activations when estimating what fits: a FLUX.1 1024² forward peaks at
# about 2 GiB of activations; Wan2.1-14B at 832×480×81 at about 4 GiB (measured beside diffusers' group offload,
# benchmarks/RESULTS.md), twice that at 720p.
ACTIVATION_ROOM_GIB = {"image": 4.0, "video": 8.0}

# Component names (as model_index.json writes them) by the offload flag that covers them.
OFFLOAD_KINDS = {
    "text_encoder_cpu_offload": ("text_encoder",),
    "image_encoder_cpu_offload": ("image_encoder",),
    "vae_cpu_offload": ("vae",),
}


@dataclass
class DiTSize:
    total: int  # bytes of every weight
    blocks: list[int]  # bytes of each repeated block in its flat buffer (aligned)
    prefetch: int  # the model's offload_prefetch_size

    @property
    def outside_blocks(self) -> int:
        return max(0, self.total - sum(self.blocks))


@dataclass
class ComponentSizes:
    dits: dict[str, DiTSize] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)  # encoders and VAE: bytes


@dataclass
class MemoryPlan:
    dit_layerwise_offload: bool
    offload_prefetch_size: int | None  # blocks ahead (None when layerwise offload is off)
    offloaded: list[str]  # components kept on the host between calls
    estimate_bytes: int | None = None  # the estimate that was checked against the budget (None: no budget)
    budget_bytes: int | None = None
    reason: str = ""  # why: "flags", "max_gpu_memory", "model size"

    def describe(self) -> str:
        parts = []
        if self.dit_layerwise_offload:
            parts.append(f"DiT layerwise offload (prefetch {self.offload_prefetch_size})")
        if self.offloaded:
            parts.append("CPU offload of " + ", ".join(self.offloaded))
        what = " + ".join(parts) or "everything on the device"
        if self.estimate_bytes is not None and self.budget_bytes is not None:
            what += f" (estimate {self.estimate_bytes / GIB:.1f} of {self.budget_bytes / GIB:.1f} GiB)"
        return what + (f", for {self.reason}" if self.reason else "")

    def to_dict(self) -> dict:
        return {
            "dit_layerwise_offload": self.dit_layerwise_offload,
            "offload_prefetch_size": self.offload_prefetch_size,
            "cpu_offloaded": list(self.offloaded),
            "estimate_gib": None if self.estimate_bytes is None else round(self.estimate_bytes / GIB, 2),
            "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GIB, 2),
            "reason": self.reason,
        }


def offload_kind(component: str) -> str | None:
    """The flag whose offload covers this component (text_encoder_2 is a text encoder), or None."""
    for flag, prefixes in OFFLOAD_KINDS.items():
        if component.startswith(prefixes):
            return flag
    return None


def component_sizes(source, dtype: torch.dtype, measure: bool = True) -> ComponentSizes:
    """Bytes of every model component of `source` (a loader.folder.ModelSource) in `dtype`, built on meta;
    `measure` False: the components and the DiTs' prefetch sizes only (every size 0), for plans from flags alone."""
    from ditserve.loader.folder import construct_library_model, library_class
    from ditserve.loader.weights import build_on_meta
    from ditserve.registry import load_object

    spec = source.spec
    dits = {d.component: d for d in spec.dits}
    sizes = ComponentSizes()
    for name, (library, class_name) in spec.components.items():
        if not source.has(name):
            continue
        if name in dits:
            cls = load_object(dits[name].model)
            if not measure:
                sizes.dits[name] = DiTSize(0, [], getattr(cls, "offload_prefetch_size", DEFAULT_PREFETCH))
                continue
            model = build_on_meta(functools.partial(cls.from_config, source.config(name)), dtype)
            blocks = [_layout(_module_tensors(b))[1] for b in model.repeated_blocks()]
            prefetch = getattr(model, "offload_prefetch_size", DEFAULT_PREFETCH)
            sizes.dits[name] = DiTSize(tensor_bytes(model), blocks, prefetch)
        elif offload_kind(name) is not None and not measure:
            sizes.others[name] = 0
        elif offload_kind(name) is not None:
            cls = library_class(library, class_name)
            raw = source.config(name)
            config_cls = getattr(cls, "config_class", None) if library == "transformers" else None
            with torch.device("meta"):
                model = construct_library_model(cls, raw, config_cls)
            sizes.others[name] = sum(t.numel() for t in _module_tensors(model)) * dtype.itemsize
    return sizes


def estimate(
    sizes: ComponentSizes, output: str, layerwise: bool, prefetch: int, offloaded: set[str], graphs: bool = False
) -> int:
    """Device bytes a request needs with these offloads (see the module's docstring); `graphs`: the DiT runs under
    CUDA graphs, whose pool keeps the activations' memory."""
    resident = sum(b for n, b in sizes.others.items() if n not in offloaded)
    running = max((b for n, b in sizes.others.items() if n in offloaded), default=0)
    if layerwise and sizes.dits:
        slot = max(max(d.blocks, default=0) for d in sizes.dits.values())
        slots = min(prefetch + 1, max(len(d.blocks) for d in sizes.dits.values()))
        dits = sum(d.outside_blocks for d in sizes.dits.values()) + slots * slot
    else:
        dits = sum(d.total for d in sizes.dits.values())
    activations = int(ACTIVATION_ROOM_GIB[output] * GIB)
    return resident + dits + (running + activations if graphs else max(running, activations))


def plan(args: EngineArgs, sizes: ComponentSizes, output: str, device_bytes: int | None) -> MemoryPlan:
    """The offloads to apply. `device_bytes`: the device's total memory (None on the CPU)."""
    forced = {n for n in sizes.others if getattr(args, offload_kind(n) or "", False)}
    model_prefetch = max((d.prefetch for d in sizes.dits.values()), default=DEFAULT_PREFETCH)
    prefetch = args.offload_prefetch_size or model_prefetch
    layerwise = args.dit_layerwise_offload
    graphs = args.cuda_graphs and device_bytes is not None
    if args.max_gpu_memory is None:
        reason = "flags"
        if layerwise is None:
            # As other engines do for video models: offload the blocks when the model would not fit with room to run.
            fits = device_bytes is None or estimate(sizes, output, False, prefetch, forced, graphs) <= device_bytes
            layerwise = output == "video" and not fits
            reason = "model size" if layerwise else reason
        return MemoryPlan(layerwise, prefetch if layerwise else None, sorted(forced), reason=reason)

    budget = int(args.max_gpu_memory * GIB)
    open_components = sorted((n for n in sizes.others if n not in forced), key=lambda n: sizes.others[n])
    dit_bytes = sum(sum(d.blocks) for d in sizes.dits.values())
    candidates = []
    for count in range(len(open_components) + 1):
        for chosen in itertools.combinations(open_components, count):
            offloaded = forced | set(chosen)
            moved = sum(sizes.others[n] for n in offloaded)
            for lw in [layerwise] if layerwise is not None else [False, True]:
                prefetches = [prefetch] if not lw or args.offload_prefetch_size else range(prefetch, 0, -1)
                for n in prefetches:
                    need = estimate(sizes, output, lw, n, offloaded, graphs)
                    # Copying the blocks every forward costs more than any component once per request.
                    cost = (moved + (dit_bytes * 1000 if lw else 0), -n)
                    candidates.append((cost, need, lw, n, offloaded))
    fitting = [c for c in candidates if c[1] <= budget]
    if not fitting:
        least = min(candidates, key=lambda c: c[1])
        _, need, lw, n, offloaded = least
        detail = MemoryPlan(lw, n if lw else None, sorted(offloaded)).describe()
        raise ConfigError(
            "max_gpu_memory",
            f"{args.max_gpu_memory:g} GiB is too little for this model: the least it needs is about "
            f"{need / GIB:.1f} GiB ({detail}, with {ACTIVATION_ROOM_GIB[output]:g} GiB for activations)",
        )
    _, need, lw, n, offloaded = min(fitting, key=lambda c: c[0])
    return MemoryPlan(lw, n if lw else None, sorted(offloaded), need, budget, "max_gpu_memory")


__all__ = ["ComponentSizes", "DiTSize", "MemoryPlan", "component_sizes", "estimate", "offload_kind", "plan"]
