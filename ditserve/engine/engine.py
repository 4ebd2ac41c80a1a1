"""Engine: loads a pipeline once and serves generation requests in this process.

`Engine.from_pretrained(...)` resolves the model (folder, preset or built-in), loads it, and `generate(...)`
validates a request, fills the model's defaults, runs the pipeline and returns images with timings and peak memory.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ditserve.accel.cache_config import CacheConfig
from ditserve.accel.compile import compile_repeated_blocks
from ditserve.accel.cuda_graph import CudaGraphs, GraphPool, enable_cuda_graphs
from ditserve.accel.memory_plan import MemoryPlan, component_sizes, plan
from ditserve.accel.offload import BlockOffload, ComponentOffload, enable_layerwise_offload
from ditserve.config import ConfigError, EngineArgs, SamplingParams
from ditserve.engine.distributed import (
    RankPlacement,
    all_gather_json,
    broadcast_json,
    free_port,
    init_process_group,
    rank_main,
    rank_start_context,
    torchrun_placement,
)
from ditserve.layers.attention import needs_fp8_tensor_cores, set_attention_backend
from ditserve.loader.folder import resolve_model
from ditserve.parallel.groups import ParallelConfigError, ParallelGroups, init_parallel_groups
from ditserve.parallel.sequence import enable_sequence_parallel
from ditserve.pipelines import Pipeline
from ditserve.pipelines.base import StepCallback, check_attention, offered_sparse_backends
from ditserve.registry import load_object
from ditserve.utils import profiling
from ditserve.utils.memory import device_stats, is_out_of_memory, out_of_memory, peak_mb, reset_peak

log = logging.getLogger(__name__)


class _StoppedByDriver(Exception):
    """Rank 0 ended the running request early (it was cancelled); the other ranks drop it too."""


@dataclass
class GenerationResult:
    images: list[Any]
    seed: int
    params: SamplingParams  # the request as run, every default filled in
    timings: dict = field(default_factory=dict)  # seconds: encode, prepare, denoise, decode, total; steps: [...]
    peak_memory_mb: float | None = None  # peak device memory during this request (None on the CPU)
    videos: list[Any] = field(default_factory=list)  # video families: uint8 (T, H, W, 3) arrays (see PipelineOutput)

    @property
    def memory(self) -> dict | None:
        """Peak allocated device memory per stage and per rank, and the allocator's counts after the request, in MiB
        (`timings["memory"]`; figures are None on the CPU): {"peak_allocated_mb", "stages": {stage: MiB},
        "ranks": [{"rank", "device", "peak_allocated_mb", "allocated_mb", "reserved_mb", "stages"}]}."""
        return self.timings.get("memory")


class Engine:
    def __init__(self, args: EngineArgs, placement: RankPlacement | None = None):
        self.args = args
        self.parallel = args.parallel_config()
        self.groups: ParallelGroups | None = None
        self.cuda_graphs: dict[str, CudaGraphs] = {}  # per DiT component, when they replay as CUDA graphs
        self.memory_plan: MemoryPlan | None = None  # the offloads in effect (accel/memory_plan.py)
        self.block_offloads: dict[str, BlockOffload] = {}  # per DiT component, under layerwise offload
        self.component_offloads: dict[str, ComponentOffload] = {}  # encoders and VAE kept on the host
        self._control = None  # gloo group rank 0 broadcasts operations on
        self._rank_processes: list = []
        self._closed = False
        self.rank = 0
        self.device = args.resolved_device()
        self.dtype = args.resolved_dtype()
        if args.nvtx:
            if self.device.type != "cuda":
                raise ConfigError("nvtx", f"NVTX ranges are for Nsight Systems on CUDA devices, not {self.device}")
            try:
                profiling.set_nvtx(True)
            except profiling.ProfileConfigError as e:
                raise ConfigError(e.field, e.message) from None
        self.source = resolve_model(args.model, args.load_format, args.backend)
        load_object(self.source.spec.pipeline).check_engine_args(args, self.source)
        check_attention(
            args.attention_backend, offered_sparse_backends(self.source), "attention_backend", self.source.spec.family
        )
        if self.parallel.world_size > 1:
            # Refuse a split the model cannot take before any process is started.
            try:
                for dit in self.source.dits:
                    model_cls = load_object(dit.model)
                    self.parallel.check_model(model_cls.attention_heads(self.source.config(dit.component)))
                if placement is None and torchrun_placement() is None:  # this process starts the other ranks
                    self.parallel = self.parallel.for_fresh_ranks()
                    if self.parallel.ulysses_exchange != args.ulysses_exchange:
                        # The ranks build their config from the arguments: they get the method chosen here.
                        self.args = args = dataclasses.replace(args, ulysses_exchange=self.parallel.ulysses_exchange)
            except ParallelConfigError as e:
                raise ConfigError(e.field, e.message) from None
        try:
            self._load(args, placement)
        except BaseException:
            self._abandon()
            raise

    def _load(self, args: EngineArgs, placement: RankPlacement | None) -> None:
        if self.parallel.world_size > 1:
            placement = placement or torchrun_placement() or self._start_ranks()
            init_process_group(placement, self.device.type)
            self.rank = placement.rank
            if self.device.type == "cuda":
                self.device = torch.device("cuda", placement.local_rank)
            # Groups first: tensor-parallel layers read their group while the model is built.
            self.groups = init_parallel_groups(self.parallel)
            self._control = dist.new_group(backend="gloo")
        if args.quantization == "fp8":  # before the (long) load: a card without FP8 tensor cores is refused
            from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device

            try:
                check_fp8_device(self.device)
            except FP8Unsupported as e:
                raise ConfigError("quantization", str(e)) from None
        if needs_fp8_tensor_cores(args.attention_backend):
            from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device

            try:
                check_fp8_device(self.device, "Choose another --attention-backend.")
            except FP8Unsupported as e:
                raise ConfigError("attention_backend", str(e)) from None
        cls = load_object(self.source.spec.pipeline)
        self.memory_plan = self._plan_memory(args)
        host = set(self.memory_plan.offloaded)
        if self.memory_plan.dit_layerwise_offload:
            host |= {d.component for d in self.source.dits}
        self.pipeline: Pipeline = cls.load(
            self.source, self.device, self.dtype, args.load_format, args.seed_for_dummy_weights, frozenset(host)
        )
        transformers = self.pipeline.transformers().values()
        if args.quantization == "fp8":
            from ditserve.accel.fp8 import quantize_dit

            for transformer in transformers:
                quantize_dit(transformer)
        if self.groups is not None:
            self.pipeline.parallel = self.groups
            if self.groups.sequence is not None:
                # Our launcher starts every rank on this machine unless --nnodes says otherwise; torchrun says how
                # many of them it started here.
                world = self.parallel.world_size
                one_machine = args.nnodes == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
                for transformer in transformers:
                    enable_sequence_parallel(
                        transformer,
                        self.groups.sequence,
                        ulysses_exchange=self.parallel.ulysses_exchange,
                        one_machine=one_machine,
                        graphed=args.cuda_graphs and self.device.type == "cuda",
                    )
        for transformer in transformers:
            set_attention_backend(transformer, args.attention_backend, self.device)
        self._apply_memory_plan(args)
        if args.vae_tiling:
            self.pipeline.vae.enable_tiling()
            if self.parallel.world_size > 1:
                self.pipeline.decode_group = dist.group.WORLD
        if args.vae_slicing:
            if not callable(getattr(self.pipeline.vae, "enable_slicing", None)):
                raise ConfigError("vae_slicing", f"{type(self.pipeline.vae).__name__} cannot decode in slices")
            self.pipeline.vae.enable_slicing()
        self.pipeline.configure(args, self.groups)
        # The DiTs take turns (Wan2.2's experts): their graphs share one pool, so its memory is held once.
        graph_pool = GraphPool() if args.cuda_graphs and self.device.type == "cuda" else None
        for name, transformer in self.pipeline.transformers().items():
            if args.compile:
                compile_repeated_blocks(transformer)
            if graph_pool is not None:
                self.cuda_graphs[name] = enable_cuda_graphs(transformer, self.device, pool=graph_pool)
        # One request at a time per engine: the pipeline's modules are shared state. LoRA changes take the same
        # lock, so they land between requests and a request never sees half of one LoRA state and half of another.
        self._lock = threading.Lock()
        self.lora = self.pipeline.lora_manager()
        for name, offload in self.block_offloads.items():
            self.lora.weight_access[name] = offload.host_weights  # a merge changes the host copies
        if self.is_driver and self.parallel.world_size > 1:
            atexit.register(self.close)

    def _plan_memory(self, args: EngineArgs) -> MemoryPlan:
        """The offloads the flags, the budget or the model's size call for (logged: what was picked and why)."""
        spec = self.source.spec
        if self.source.backend != "native":  # diffusers places its own pipeline (its group offload: `configure`)
            return MemoryPlan(False, None, [], reason="the diffusers backend")
        total = None
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
        # Sizes matter to a budget, and to the default for video models on a GPU; flags alone need none.
        auto = args.dit_layerwise_offload is None and spec.output == "video" and total is not None
        sizes = component_sizes(self.source, self.dtype, measure=args.max_gpu_memory is not None or auto)
        if args.dit_layerwise_offload and not sizes.dits:
            raise ConfigError("dit_layerwise_offload", f"{spec.family} has no DiT of ours to offload")
        chosen = plan(args, sizes, spec.output, total)
        if chosen.dit_layerwise_offload or chosen.offloaded:
            log.info("memory: %s", chosen.describe())
        if args.max_gpu_memory is not None and total is not None:
            # The budget is a cap, as a smaller card would be: a request beyond it fails as out of memory.
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_gpu_memory * 2**30 / total), index)
        return chosen

    def _apply_memory_plan(self, args: EngineArgs) -> None:
        memory_plan = self.memory_plan
        assert memory_plan is not None
        if memory_plan.dit_layerwise_offload:
            dits = self.pipeline.transformers()
            offloads = enable_layerwise_offload(
                list(dits.values()), self.device, memory_plan.offload_prefetch_size, pin=True
            )
            self.block_offloads = dict(zip(dits, offloads))
        for name in memory_plan.offloaded:
            module = getattr(self.pipeline.c, name, None)
            if module is not None:
                self.component_offloads[name] = ComponentOffload(module, self.device, pin=args.pin_cpu_memory)

    @property
    def is_driver(self) -> bool:
        """Rank 0 takes requests; the other ranks `follow()` it."""
        return self.rank == 0

    def _start_ranks(self) -> RankPlacement:
        """Spawn this node's other ranks; return this process's place (the node's first rank)."""
        args = self.args
        local_world = self.parallel.world_size // args.nnodes
        if args.nnodes == 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            init_method = f"tcp://{args.dist_init_addr}"
        base = args.node_rank * local_world
        context = rank_start_context(self.device)
        for local in range(1, local_world):
            placement = RankPlacement(base + local, self.parallel.world_size, local, init_method)
            process = context.Process(target=rank_main, args=(args.to_dict(), dataclasses.asdict(placement)))
            process.start()
            self._rank_processes.append(process)
        return RankPlacement(base, self.parallel.world_size, 0, init_method)

    def _broadcast(self, message: dict | None) -> dict:
        return broadcast_json(message, self._control)

    def _synced_steps(self, on_step: StepCallback | None) -> StepCallback | None:
        """With several ranks, a step callback that raises (a cancelled request) must stop every rank at the same
        step, or the others would wait forever in the next collective: rank 0 broadcasts the outcome each step."""
        if self.parallel.world_size == 1:
            return on_step

        def synced(i: int, n: int) -> None:
            error = None
            if self.is_driver and on_step is not None:
                try:
                    on_step(i, n)
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                    error = e
            flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64)
            dist.broadcast(flag, src=0, group=self._control)
            if error is not None:
                raise error
            if flag.item():
                raise _StoppedByDriver()

        return synced

    def follow(self) -> None:
        """Run what rank 0 broadcasts until it says stop (for ranks other than 0)."""
        while True:
            message = self._broadcast(None)
            op = message["op"]
            if op == "stop":
                break
            # Rank 0 returns the images: the others skip decoding, unless they decode VAE tiles with it.
            output_type = "latent" if self.pipeline.decode_group is None else "np"
            if op in ("run", "run_batch"):
                raw = [message["params"]] if op == "run" else message["params"]
                batch = [SamplingParams(**p).replace(output_type=output_type) for p in raw]
                reset_peak(self.device)
                try:
                    outputs = self.pipeline.generate(batch, self._synced_steps(None))
                except _StoppedByDriver:
                    continue
                self._gather_memory(outputs[0].timings)
            elif op == "lora":
                self._apply_lora(message["method"], message["kwargs"])
            elif op == "profile":
                if message["out_dir"] is None:
                    self._stop_profile()
                else:
                    self._start_profile(message["out_dir"], message["config"])
        self._shutdown()

    def close(self) -> None:
        """Stop the other ranks (rank 0) and leave the process group. Safe to call twice."""
        if self._closed or self.parallel.world_size == 1:
            self._closed = True
            return
        self._closed = True
        if self.is_driver:
            with self._lock:
                self._broadcast({"op": "stop"})
        self._shutdown()

    def _abandon(self) -> None:
        """A failed start: stop the ranks this process started and leave the process group."""
        self._closed = True
        for process in self._rank_processes:
            process.terminate()
        for process in self._rank_processes:
            process.join(timeout=60)
        self._shutdown()

    def _shutdown(self) -> None:
        """Forget the tensor-parallel group, leave the process group, wait for the ranks this process started.

        Every rank leaves together: NCCL's teardown waits for its peers' teardown, so rank 0 leaves before it waits
        for its ranks to exit, or on GPUs each would wait for the other (gloo on the CPU does not wait). Captured
        graphs go first: NCCL's communicator teardown blocks while a graph that captured its collectives is alive
        (pytorch/pytorch#115388)."""
        self._reset_cuda_graphs()
        from ditserve.parallel.state import set_tensor_parallel_group

        # The tensor-parallel state goes before its group: the two-shot all-reduce's symmetric-memory buffers were
        # made on the group, and freeing them after the group is gone is not a path PyTorch promises to support.
        set_tensor_parallel_group(None)
        if dist.is_initialized():
            dist.destroy_process_group()
        for process in self._rank_processes:
            process.join(timeout=60)
            if process.is_alive():  # close() must return: a rank stuck in its teardown is ended
                log.warning("rank process %s did not exit within 60 s of stop; terminating it", process.pid)
                process.terminate()
                process.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        load_format: str = "auto",
        **engine_args: Any,
    ) -> Engine:
        return cls(EngineArgs(model=path_or_preset, device=device, dtype=dtype, load_format=load_format, **engine_args))

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def backend(self) -> str:
        """ "native" (our family's pipeline) or "diffusers" (the diffusers backend)."""
        return self.source.backend

    def defaults(self) -> SamplingParams:
        return self.pipeline.defaults()

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        on_step: StepCallback | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        images: list | None = None,
        guidance_scale_2: float | None = None,
        cache: CacheConfig | dict | str | None = None,
        attention: str | None = None,
    ) -> GenerationResult:
        """One request. `num_frames` and `fps` are for video families, `images` (PIL images, arrays or paths) for
        families that take input images, `guidance_scale_2` for models with a second expert (its CFG scale; None:
        guidance_scale); the others refuse them (ConfigError naming the field). `cache`: DiT caching (a
        CacheConfig, its dict or a method name; None: the engine's `cache`; "none": off); the result's
        timings["cache"] counts the block computations skipped. `attention`: this request's attention backend
        (None: the engine's)."""
        params = SamplingParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            seed=seed,
            num_images=num_images,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
            num_frames=num_frames,
            fps=fps,
            images=images,
            guidance_scale_2=guidance_scale_2,
            cache=CacheConfig.coerce(cache) if isinstance(cache, str) else cache,
            attention=attention,
        )
        return self.run(params, on_step)

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """The request as it runs: validated against the model, its defaults filled in, and a seed drawn if it has
        none (the seed is reported back, so any image can be made again)."""
        if params.cache is None:
            params = params.replace(cache=self.args.cache)
        resolved = self.pipeline.resolve(params)
        return resolved if resolved.seed is not None else resolved.replace(seed=secrets.randbits(63))

    def run(self, params: SamplingParams, on_step: StepCallback | None = None) -> GenerationResult:
        resolved = self.resolve(params)
        self._check_driver()
        with self._lock:
            if self.parallel.world_size > 1:
                self._broadcast({"op": "run", "params": dataclasses.asdict(resolved)})
            reset_peak(self.device)
            (out,) = self._run_pipeline([resolved], on_step)
            peak = out.timings["memory"]["peak_allocated_mb"]
        return GenerationResult(
            images=out.images,
            seed=resolved.seed,
            params=resolved,
            timings=out.timings,
            peak_memory_mb=peak,
            videos=out.videos,
        )

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[GenerationResult]:
        """Requests with the same batch key (shape and settings) as one batched run; one result per request, each
        with its own seed's noise. With several ranks every rank runs the batch."""
        resolved = [self.resolve(params) for params in batch]
        self._check_driver()
        with self._lock:
            if self.parallel.world_size > 1:
                self._broadcast({"op": "run_batch", "params": [dataclasses.asdict(r) for r in resolved]})
            reset_peak(self.device)
            outputs = self._run_pipeline(resolved, on_step)
            peak = outputs[0].timings["memory"]["peak_allocated_mb"]
        return [
            GenerationResult(
                images=o.images, seed=r.seed, params=r, timings=o.timings, peak_memory_mb=peak, videos=o.videos
            )
            for r, o in zip(resolved, outputs)
        ]

    def _run_pipeline(self, batch: list[SamplingParams], on_step: StepCallback | None) -> list:
        """The pipeline on a resolved batch, its memory figures added to each output's timings["memory"]. Running out
        of device memory fails this batch alone: what it allocated is freed and the error says so."""
        failure = None
        try:
            outputs = self.pipeline.generate(batch, self._synced_steps(on_step))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failure = str(e)
        if failure is not None:  # outside the handler: the failed run's frames, and their tensors, are gone
            # Graphs captured for the failed request's shapes hold their pool memory: drop them (the next request
            # captures what it needs again). With no graph left to use them, cuBLAS's per-stream workspaces go too.
            self._reset_cuda_graphs()
            if self.device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
                torch._C._cuda_clearCublasWorkspaces()
            raise out_of_memory(failure, self.device)
        memory = self._gather_memory(outputs[0].timings)
        for output in outputs:
            output.timings.pop("stage_peak_memory_mb", None)
            output.timings["memory"] = copy.deepcopy(memory)
        return outputs

    def _gather_memory(self, timings: dict) -> dict:
        """This rank's peak per stage and the allocator's counts, gathered from every rank (each calls this after the
        same batch): {"peak_allocated_mb", "stages", "ranks": [...]} with rank 0's peak and stages on top."""
        stages = dict(timings.get("stage_peak_memory_mb") or {})
        now = device_stats(self.device)
        end = peak_mb(self.device)
        peaks = [v for v in [*stages.values(), end] if v is not None]
        mine = {
            "rank": self.rank,
            "device": now["device"],
            "peak_allocated_mb": round(max(peaks), 1) if peaks else None,
            "allocated_mb": now["allocated_mb"],
            "reserved_mb": now["reserved_mb"],
            "stages": stages,
        }
        ranks = [mine]
        if self.parallel.world_size > 1:
            ranks = all_gather_json(mine, self._control)
        return {"peak_allocated_mb": mine["peak_allocated_mb"], "stages": stages, "ranks": ranks}

    # ---- profiling (utils/profiling.py) ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def profile(self, out_dir: str | Path, stages=None, steps=None, record_shapes: bool = False):
        """Profile the requests run inside: a torch.profiler trace (Chrome/Perfetto JSON) per request and window,
        in `out_dir`; `stages` (names, or "encode,denoise"; None: all) and `steps` ("2:4" or (2, 4): denoising
        steps 2 and 3). Yields the session; its `traces` lists the files once the block ends."""
        self.start_profile(str(out_dir), stages=stages, steps=steps, record_shapes=record_shapes)
        session = profiling.current()
        try:
            yield session
        finally:
            self.stop_profile()

    def start_profile(self, out_dir: str, stages=None, steps=None, record_shapes: bool = False) -> dict:
        """Arm a profile for the requests that follow (every rank writes its own traces); ended by stop_profile."""
        self._check_driver()
        settings = {"stages": stages, "steps": steps, "record_shapes": record_shapes}
        try:
            config = profiling.ProfileConfig.coerce(settings)
        except profiling.ProfileConfigError as e:
            raise ConfigError(e.field, e.message) from None
        with self._lock:
            self._start_profile(out_dir, config.to_dict())
            if self.parallel.world_size > 1:
                self._broadcast({"op": "profile", "out_dir": out_dir, "config": config.to_dict()})
        return {"profiling": True, "out_dir": out_dir, **config.to_dict()}

    def stop_profile(self) -> dict:
        """End the profile; the trace files this rank wrote (every rank writes beside them, `.rankN.json`)."""
        self._check_driver()
        with self._lock:
            traces = self._stop_profile()
            if self.parallel.world_size > 1:
                self._broadcast({"op": "profile", "out_dir": None, "config": None})
        return {"profiling": False, "traces": [str(p) for p in traces]}

    def _start_profile(self, out_dir: str, config: dict) -> None:
        try:
            profiling.start(config, out_dir, self.rank, self.device)
        except profiling.ProfileConfigError as e:
            raise ConfigError(e.field, e.message) from None

    def _stop_profile(self) -> list[Path]:
        session = profiling.stop()
        return [] if session is None else session.traces

    # ---- LoRA (inputs and outputs are plain data, so the HTTP routes can pass them through) --------------------------
    def set_lora(
        self,
        lora_nickname: str | list[str],
        lora_path: str | list[str | None] | None = None,
        strength: float | list[float] = 1.0,
        target: str | list[str] = "all",
    ) -> dict:
        """Load (if new) and activate these adapters with these strengths on the target(s); `[]` turns LoRA off.

        Raises `LoRAError` (a ValueError with `.field` and `.message`) on any bad input, leaving the previous state unchanged.
        Returns `list_loras()`.
        """
        return self._lora_op(
            "set_lora", lora_nickname=lora_nickname, lora_path=lora_path, strength=strength, target=target
        )

    def merge_lora_weights(self, strength: float = 1.0, target: str | list[str] = "all") -> dict:
        """Fold the active adapters (times `strength`) into the weights, keeping W0 for an exact unmerge."""
        return self._lora_op("merge_lora_weights", strength=strength, target=target)

    def unmerge_lora_weights(self, target: str | list[str] = "all") -> dict:
        """Restore W0 bit for bit; the target runs the base model until set_lora or merge_lora_weights."""
        return self._lora_op("unmerge_lora_weights", target=target)

    def _lora_op(self, method: str, **kwargs) -> dict:
        """Run a LoRA change here; with several ranks, once it succeeded (inputs are validated before anything is
        applied), every other rank makes the same change to its shard of the weights."""
        self._check_driver()
        with self._lock:
            result = self._apply_lora(method, kwargs)
            if self.parallel.world_size > 1:
                self._broadcast({"op": "lora", "method": method, "kwargs": kwargs})
            return result

    def _apply_lora(self, method: str, kwargs: dict) -> dict:
        try:
            return getattr(self.lora, method)(**kwargs)
        finally:
            # Captured graphs hold the kernels and weight tensors of the LoRA state they were captured in.
            self._reset_cuda_graphs()

    def _reset_cuda_graphs(self) -> None:
        for graphs in self.cuda_graphs.values():
            graphs.reset()

    def _check_driver(self) -> None:
        if not self.is_driver:
            raise RuntimeError(f"rank {self.rank} follows rank 0: call follow(), not the request API")
        if self._closed and self.parallel.world_size > 1:
            raise RuntimeError("this engine was closed")

    def list_loras(self) -> dict:
        """Loaded adapters and, per target, the active ones with strengths and the mode (off, dynamic, merged).

        Answered without waiting for a running request: it is the state as of the last completed LoRA change,
        which is the state every request from now on runs with."""
        return copy.deepcopy(self.lora.published)
