"""FLUX.1 text-to-image: CLIP pooled + T5 encoding → packed latents → flow-matching Euler → VAE decode.

Every stage reproduces diffusers' FluxPipeline (0.42.1) step for step, so that the same folder and seed give the
same image: the same tokenizer settings, the same noise draw, the same sigma schedule with dynamic shift, the same
scheduler, the same decode and post-processing. Only the DiT is ours.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditserve.config import SamplingParams
from ditserve.models.flux import FluxTransformer, to_diffusers_state_dict
from ditserve.parallel.vae import needs_tiling, tiled_decode
from ditserve.pipelines.base import (
    BENCH_PROMPT,
    Pipeline,
    PipelineOutput,
    StepCallback,
    diffusers_model_sharing,
    seeded_noise,
)
from ditserve.utils.timing import StageTimer


@dataclass
class FluxComponents:
    transformer: FluxTransformer
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    text_encoder_2: nn.Module
    tokenizer_2: object
    scheduler: object


def calculate_shift(seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent shift μ of the sigma schedule (linear in the number of image tokens)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C]: 2×2 patches become tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of h × w."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def latent_image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h2·w2), 3] position ids (0, row, col) of the packed image tokens."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def diffusers_transformer_sharing(ours: FluxTransformer) -> nn.Module:
    """diffusers' FluxTransformer2DModel holding our tensors (no copy)."""
    from diffusers import FluxTransformer2DModel

    # FluxConfig's fields are diffusers' config names, so the config passes through as is.
    config = {**dataclasses.asdict(ours.config), "axes_dims_rope": list(ours.config.axes_dims_rope)}
    return diffusers_model_sharing(FluxTransformer2DModel, config, to_diffusers_state_dict(ours))


class FluxPipeline(Pipeline):
    components_class = FluxComponents
    c: FluxComponents

    def __init__(self, spec, components: FluxComponents, device, dtype, sampling_defaults: dict | None = None):
        from diffusers.image_processor import VaeImageProcessor

        super().__init__(spec, components, device, dtype, sampling_defaults)
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.latent_channels = components.transformer.config.in_channels // 4

    @property
    def default_side(self) -> int:
        return 128 * self.vae_scale_factor

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * 2

    # ---- stages -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], num_images: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 sequence embeddings, CLIP pooled embedding, text position ids), repeated num_images times."""
        clip_ids = self.c.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.c.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(self.c.text_encoder.dtype).repeat_interleave(num_images, dim=0)

        t5_ids = self.c.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_length=False,
            return_overflowing_tokens=False,
            return_tensors="pt",
        ).input_ids
        embeds = self.c.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        embeds = embeds.to(self.c.text_encoder_2.dtype).repeat_interleave(num_images, dim=0)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.c.text_encoder.dtype)
        return embeds, pooled, text_ids

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

    def prepare_latents(
        self, seed: int, batch: int, height: int, width: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.latent_grid(height, width)
        noise = seeded_noise((batch, self.latent_channels, h, w), seed, dtype, self.device)
        return pack_latents(noise), latent_image_ids(h // 2, w // 2, self.device, dtype)

    def make_scheduler(self, num_steps: int, image_seq_len: int):
        """A fresh scheduler per request (it keeps a step index), set to the request's sigma schedule."""
        scheduler = type(self.c.scheduler).from_config(self.c.scheduler.config)
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        img_ids: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        params: SamplingParams,
        timer: StageTimer,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        scheduler = self.make_scheduler(params.num_inference_steps, latents.shape[1])  # type: ignore[arg-type]
        batch = latents.shape[0]
        guidance = None
        if self.c.transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32).expand(batch)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            timer.step_begin()
            timestep = t.expand(batch).to(latents.dtype) / 1000
            noise_pred = self.predict_noise(latents, img_ids, cond, uncond, timestep, guidance, params.true_cfg_scale)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.step_end()
            if on_step is not None:
                on_step(i, len(timesteps))
        return latents

    def predict_noise(self, latents, img_ids, cond, uncond, timestep, guidance, true_cfg_scale) -> torch.Tensor:
        """The DiT's velocity, with true CFG when a negative branch exists.

        With CFG parallelism the two branches run at once on the two halves of the ranks, and an all-gather gives
        every rank both predictions (so every rank takes the same scheduler step).
        """

        def branch(embeds):
            return self.c.transformer(latents, embeds[0], embeds[1], timestep, img_ids, embeds[2], guidance)

        if uncond is None:
            return branch(cond)
        cfg_group = self.parallel.cfg_group if self.parallel is not None else None
        if cfg_group is None:
            positive, negative = branch(cond), branch(uncond)
        else:
            mine = branch(cond if self.parallel.cfg_index == 0 else uncond).contiguous()
            both = [torch.empty_like(mine), torch.empty_like(mine)]
            dist.all_gather(both, mine, group=cfg_group)
            positive, negative = both
        return negative + true_cfg_scale * (positive - negative)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> list:
        if output_type == "latent":
            return list(latents)
        h, w = self.latent_grid(height, width)
        x = unpack_latents(latents, h, w)
        x = x / self.c.vae.config.scaling_factor + self.c.vae.config.shift_factor
        if needs_tiling(self.c.vae, x):
            image = tiled_decode(self.c.vae, x, self.decode_group)
        elif self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []  # one tile: rank 0 decodes it alone
        else:
            image = self.c.vae.decode(x, return_dict=False)[0]
        out = self.image_processor.postprocess(image, output_type=output_type)
        return list(out)

    # ---- benchmarks and parity checks --------------------------------------------------------------------------
    def forward_inputs(self, height: int, width: int) -> dict:
        cond = self.encode_prompt([BENCH_PROMPT], 1, self.defaults().max_sequence_length)  # type: ignore[arg-type]
        latents, img_ids = self.prepare_latents(0, 1, height, width, cond[0].dtype)
        guidance = None
        if self.c.transformer.config.guidance_embeds:
            guidance = torch.full((1,), self.defaults().guidance_scale, device=self.device, dtype=torch.float32)  # type: ignore[arg-type]
        return dict(
            hidden_states=latents,
            encoder_hidden_states=cond[0],
            pooled_projections=cond[1],
            timestep=torch.full((1,), 0.7, device=self.device, dtype=latents.dtype),
            img_ids=img_ids,
            txt_ids=cond[2],
            guidance=guidance,
        )

    def diffusers_pipeline(self):
        from diffusers import FluxPipeline as DiffusersFluxPipeline

        pipe = DiffusersFluxPipeline(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            text_encoder_2=self.c.text_encoder_2,
            tokenizer_2=self.c.tokenizer_2,
            transformer=diffusers_transformer_sharing(self.c.transformer),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- several requests as one batched forward --------------------------------------------------------------
    @torch.no_grad()
    def _encode_repeated(
        self, prompts: list[str], repeats: list[int], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """encode_prompt for prompts that each want a different number of images: one encoder call, then repeat."""
        embeds, pooled, text_ids = self.encode_prompt(prompts, 1, max_sequence_length)
        counts = torch.tensor(repeats, device=embeds.device)
        return embeds.repeat_interleave(counts, dim=0), pooled.repeat_interleave(counts, dim=0), text_ids

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key as one batch: one encode, one denoise loop, one decode.

        Each request keeps its own seed: the initial noise is each request's own draw (as it would be alone),
        concatenated. Results match the requests run alone up to float rounding of the larger matmuls.
        """
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        first = batch[0]
        timer = StageTimer(self.device)
        prompt_lists = [[p.prompt] if isinstance(p.prompt, str) else list(p.prompt) for p in batch]
        repeats = [p.num_images for p, prompts in zip(batch, prompt_lists) for _ in prompts]
        with timer.stage("encode"):
            flat = [text for prompts in prompt_lists for text in prompts]
            cond = self._encode_repeated(flat, repeats, first.max_sequence_length)  # type: ignore[arg-type]
            uncond = None
            if first.true_cfg_scale > 1 and first.negative_prompt is not None:  # type: ignore[operator]
                negs: list[str] = []
                for p, prompts in zip(batch, prompt_lists):
                    own = [p.negative_prompt] if isinstance(p.negative_prompt, str) else list(p.negative_prompt)  # type: ignore[arg-type]
                    negs += own * len(prompts) if len(own) == 1 else own
                uncond = self._encode_repeated(negs, repeats, first.max_sequence_length)  # type: ignore[arg-type]
        counts = [len(prompts) * p.num_images for p, prompts in zip(batch, prompt_lists)]
        with timer.stage("prepare"):
            parts = [
                self.prepare_latents(p.seed, n, p.height, p.width, cond[0].dtype)  # type: ignore[arg-type]
                for p, n in zip(batch, counts)
            ]
            latents, img_ids = torch.cat([lat for lat, _ in parts]), parts[0][1]
        with timer.stage("denoise"):
            latents = self.denoise(latents, img_ids, cond, uncond, first, timer, on_step)
        with timer.stage("decode"):
            images = self.decode(latents, first.height, first.width, first.output_type)  # type: ignore[arg-type]
        timings = {**timer.summary(), "batch_size": len(batch)}
        outputs, start = [], 0
        for n in counts:
            outputs.append(PipelineOutput(images=images[start : start + n], timings=dict(timings)))
            start += n
        return outputs
