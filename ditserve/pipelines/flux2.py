"""FLUX.2 text-to-image and multi-reference editing: LLM hidden states → packed latents (+ reference-image latents)
→ flow-matching Euler → VAE decode.

Every stage reproduces diffusers' Flux2Pipeline ([dev]) and Flux2KleinPipeline ([klein]) (0.42.1) step for step, so
that the same folder and seed give the same image:
- text: [dev] Mistral Small 3.x on the chat-formatted prompt (diffusers' FLUX.2 system message, "[IMG]" removed from
  the prompt), [klein] Qwen3 on its chat template (thinking off), each padded to max_sequence_length; the hidden
  states of three layers ([dev] 10, 20, 30; [klein] 9, 18, 27) side by side per token; text ids (0, 0, 0, l);
- noise: [B, in_channels, H/16, W/16] drawn in the text embeddings' dtype, packed row-major into tokens with ids
  (0, h, w, 0);
- reference images (the request's `images`): each checked as diffusers checks them (sides ≥ 64, aspect ≤ 8:1),
  shrunk to 1024² pixels when larger, cropped to multiples of 16, VAE-encoded (the distribution's mode), patchified
  2×2, normalised by the VAE's batch-norm statistics, packed, with ids (10 + 10·i, h, w, 0); their tokens follow the
  noisy latents' in the DiT's image sequence and the prediction for them is dropped. With no size given, the output
  takes the first image's (processed) size;
- schedule: sigmas linspace(1, 1/n, n) shifted by BFL's empirical μ (a function of the token count and the steps);
- [dev] embeds guidance_scale (guidance distillation, no CFG); [klein] runs true CFG with guidance_scale when it is
  > 1 and model_index.json does not say is_distilled, against the negative prompt ("" by default, as diffusers);
- decode: the batch-norm statistics undone, 2×2 unpatchified, the VAE's decode and image post-processing.
Only the DiT is ours. Input images are turned into PNG data URIs when the request is resolved, so a request stays
plain data; requests batch together only with the same reference images.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditserve.config import ConfigError, SamplingParams
from ditserve.models.flux2 import Flux2Transformer, to_diffusers_state_dict
from ditserve.parallel.vae import needs_tiling, tiled_decode
from ditserve.pipelines.base import (
    BENCH_PROMPT,
    Pipeline,
    PipelineOutput,
    StepCallback,
    diffusers_model_sharing,
    prompts_with_negatives,
    seeded_noise,
)
from ditserve.pipelines.input_images import as_data_uri, load_image
from ditserve.utils.timing import StageTimer

REFERENCE_MAX_AREA = 1024 * 1024  # reference images are shrunk to this many pixels when larger (diffusers)
REFERENCE_MIN_SIDE = 64  # diffusers' Flux2ImageProcessor.check_image_input
REFERENCE_MAX_ASPECT = 8
REFERENCE_TIME_STEP = 10  # reference image i sits at time coordinate 10 + 10·i
# Decoded input images larger than this are refused before any resizing (a 16k × 16k image is 768 MiB of RGB).
REFERENCE_MAX_DECODED_PIXELS = 8192 * 8192


@dataclass
class Flux2Components:
    transformer: Flux2Transformer
    vae: nn.Module  # diffusers' AutoencoderKLFlux2
    text_encoder: nn.Module  # [dev] Mistral3ForConditionalGeneration, [klein] Qwen3ForCausalLM
    tokenizer: object
    scheduler: object


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's resolution- and step-dependent shift μ of the sigma schedule: linear in the token count, interpolated
    between fits at 10 and 200 steps (above 4300 tokens, the 200-step fit alone)."""
    slope_200, intercept_200 = 0.00016927, 0.45666666
    slope_10, intercept_10 = 8.73809524e-05, 1.89833333
    mu_200 = slope_200 * image_seq_len + intercept_200
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = slope_10 * image_seq_len + intercept_10
    per_step = (mu_200 - mu_10) / 190.0
    return float(per_step * num_steps + (mu_200 - 200.0 * per_step))


def position_ids(t: int, h: int, w: int, length: int, device: torch.device) -> torch.Tensor:
    """[h·w·length, 4] ids (t, row, col, l), row-major: the order tokens are packed in."""
    grids = torch.meshgrid(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(length), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1).to(device)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C] tokens, row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for an h × w grid."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, 4C, H/2, W/2]: each 2×2 patch's pixels become channels (channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def diffusers_transformer_sharing(ours: Flux2Transformer) -> nn.Module:
    """diffusers' Flux2Transformer2DModel holding our tensors (no copy)."""
    from diffusers import Flux2Transformer2DModel

    # Flux2Config's fields are diffusers' config names, so the config passes through as is.
    config = {**dataclasses.asdict(ours.config), "axes_dims_rope": list(ours.config.axes_dims_rope)}
    return diffusers_model_sharing(Flux2Transformer2DModel, config, to_diffusers_state_dict(ours))


@dataclass
class References:
    """Reference images as the DiT sees them: tokens [1, N_ref, C] and their ids [N_ref, 4]."""

    tokens: torch.Tensor
    ids: torch.Tensor


class Flux2Pipeline(Pipeline):
    """FLUX.2 [dev]: Mistral text embeddings, guidance embedded, no CFG."""

    components_class = Flux2Components
    c: Flux2Components
    text_encoder_out_layers: tuple[int, ...] = (10, 20, 30)

    def __init__(self, spec, components: Flux2Components, device, dtype, sampling_defaults: dict | None = None):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        super().__init__(spec, components, device, dtype, sampling_defaults)
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @property
    def default_side(self) -> int:
        return 128 * self.vae_scale_factor

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * 2

    # ---- validation ---------------------------------------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> SamplingParams:
        self.check_guidance(params)
        images = params.images or []
        uris = [as_data_uri(image) for image in images]
        if uris and (params.height is None or params.width is None):
            # diffusers: an edit without a size takes the first reference image's processed size.
            first = self.reference_image(load_image(uris[0]), 0)
            side_h, side_w = first.shape[-2:]
            params = params.replace(height=params.height or side_h, width=params.width or side_w)
        for i, uri in enumerate(uris[1:], start=1):
            self.reference_image(load_image(uri), i)  # refuse a bad one before the request is queued
        resolved = super().resolve(params)
        return resolved.replace(images=uris) if uris else resolved

    def check_guidance(self, params: SamplingParams) -> None:
        if params.true_cfg_scale not in (None, 1, 1.0):
            raise ConfigError(
                "true_cfg_scale",
                "FLUX.2 [dev] is guidance-distilled: guidance_scale is embedded and there is no true CFG",
            )
        if params.negative_prompt is not None:
            raise ConfigError(
                "negative_prompt",
                "FLUX.2 [dev] is guidance-distilled and takes no negative prompt (diffusers' neither)",
            )

    def batch_key(self, params: SamplingParams) -> tuple:
        return (*super().batch_key(params), tuple(params.images or ()))

    # ---- stages -------------------------------------------------------------------------------------------------
    def chat_inputs(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of the chat-formatted prompts, padded to max_sequence_length."""
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                # "[IMG]" in a prompt would be taken for an image token: diffusers removes it.
                {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
            ]
            for prompt in prompts
        ]
        return self.c.tokenizer.apply_chat_template(
            conversations,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """[B, L, 3·hidden]: the text encoder's hidden states of three layers side by side, per prompt (prompts
        that repeat are encoded once: every row is padded to the same length, so rows do not affect each other)."""
        unique = list(dict.fromkeys(prompts))
        inputs = self.chat_inputs(unique, max_sequence_length)
        output = self.c.text_encoder(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        layers = torch.stack([output.hidden_states[k] for k in self.text_encoder_out_layers], dim=2)
        embeds = layers.flatten(2).to(self.dtype)  # [B, L, layers · hidden], each token's layers side by side
        row = {p: i for i, p in enumerate(unique)}
        return embeds[torch.tensor([row[p] for p in prompts], device=embeds.device)]

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The packed token grid (rows, cols) of an image of this size."""
        return height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)

    def prepare_latents(self, seed: int, batch: int, height: int, width: int) -> torch.Tensor:
        h, w = self.latent_grid(height, width)
        channels = self.c.transformer.config.in_channels
        return pack(seeded_noise((batch, channels, h, w), seed, self.dtype, self.device))

    def reference_image(self, image, index: int) -> torch.Tensor:
        """One reference image as diffusers prepares it: [1, 3, H, W] in [-1, 1] (its checks refused naming
        `images`)."""
        width, height = image.size
        if width * height > REFERENCE_MAX_DECODED_PIXELS:
            raise ConfigError(
                "images", f"image {index} is {width}×{height}: larger than {REFERENCE_MAX_DECODED_PIXELS} pixels"
            )
        if min(width, height) < REFERENCE_MIN_SIDE:
            raise ConfigError(
                "images", f"image {index} is {width}×{height}: both sides must be at least {REFERENCE_MIN_SIDE} pixels"
            )
        if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
            raise ConfigError(
                "images",
                f"image {index} is {width}×{height}: the aspect ratio must be at most {REFERENCE_MAX_ASPECT}:1",
            )
        if width * height > REFERENCE_MAX_AREA:
            image = self.image_processor._resize_to_target_area(image, REFERENCE_MAX_AREA)
            width, height = image.size
        multiple = self.vae_scale_factor * 2
        width, height = width // multiple * multiple, height // multiple * multiple
        return self.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")

    @torch.no_grad()
    def encode_references(self, uris: list[str]) -> References:
        """The reference images' tokens and ids, in order (image i at time coordinate 10 + 10·i)."""
        vae = self.c.vae
        tokens, ids = [], []
        for i, uri in enumerate(uris):
            pixels = self.reference_image(load_image(uri), i).to(self.device, vae.dtype)
            latents = patchify(vae.encode(pixels).latent_dist.mode())
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            latents = (latents - mean) / std.to(latents.device, latents.dtype)
            h, w = latents.shape[-2:]
            tokens.append(pack(latents))
            ids.append(position_ids(REFERENCE_TIME_STEP * (i + 1), h, w, 1, self.device))
        return References(torch.cat(tokens, dim=1), torch.cat(ids))

    def make_scheduler(self, num_steps: int, image_seq_len: int):
        """A fresh scheduler per request (it keeps a step index), set to the request's sigma schedule."""
        scheduler = type(self.c.scheduler).from_config(self.c.scheduler.config)
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len, num_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def guidance(self, params: SamplingParams, batch: int) -> torch.Tensor | None:
        """The embedded guidance [B] ([dev]; diffusers passes it whether or not the DiT embeds it)."""
        return torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32).expand(batch)  # type: ignore[arg-type]

    def uses_cfg(self, params: SamplingParams) -> bool:
        return False

    def predict_noise(
        self,
        model_input: torch.Tensor,
        img_ids: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        guidance_scale: float,
        num_tokens: int,
    ) -> torch.Tensor:
        """The DiT's velocity for the noisy tokens (the first num_tokens), with true CFG when a negative branch
        exists. With CFG parallelism the two branches run at once on the two halves of the ranks, and an all-gather
        gives every rank both predictions (so every rank takes the same scheduler step)."""

        def branch(text):
            out = self.c.transformer(model_input, text[0], timestep, img_ids, text[1], guidance)
            return out[:, :num_tokens]

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
        return negative + guidance_scale * (positive - negative)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        references: References | None,
        params: SamplingParams,
        timer: StageTimer,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        batch, num_tokens = latents.shape[:2]
        scheduler = self.make_scheduler(params.num_inference_steps, num_tokens)  # type: ignore[arg-type]
        guidance = self.guidance(params, batch)
        img_ids = latent_ids if references is None else torch.cat([latent_ids, references.ids])
        ref_tokens = None if references is None else references.tokens.expand(batch, -1, -1)
        timesteps = scheduler.timesteps
        model_dtype = next(self.c.transformer.parameters()).dtype
        for i, t in enumerate(timesteps):
            timer.step_begin()
            timestep = t.expand(batch).to(latents.dtype) / 1000
            model_input = latents if ref_tokens is None else torch.cat([latents, ref_tokens.to(latents.dtype)], 1)
            noise_pred = self.predict_noise(
                model_input.to(model_dtype),
                img_ids,
                cond,
                uncond,
                timestep,
                guidance,
                params.guidance_scale,  # type: ignore[arg-type]
                num_tokens,
            )
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.step_end()
            if on_step is not None:
                on_step(i, len(timesteps))
        return latents

    def denormalize(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed tokens → the VAE's latents [B, C, H/8, W/8]: batch-norm statistics undone, 2×2 unpatchified."""
        vae = self.c.vae
        latents = unpack(tokens, *self.latent_grid(height, width))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return unpatchify(latents * std.to(latents.device, latents.dtype) + mean)

    def latent_output(self, tokens: torch.Tensor, height: int, width: int) -> list:
        """What output_type "latent" returns: [dev] the packed tokens, as diffusers' Flux2Pipeline."""
        return list(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, height: int, width: int, output_type: str) -> list:
        if output_type == "latent":
            return self.latent_output(tokens, height, width)
        x = self.denormalize(tokens, height, width).to(self.c.vae.dtype)
        if needs_tiling(self.c.vae, x):
            image = tiled_decode(self.c.vae, x, self.decode_group)
        elif self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []  # one tile: rank 0 decodes it alone
        else:
            image = self.c.vae.decode(x, return_dict=False)[0]
        return list(self.image_processor.postprocess(image, output_type=output_type))

    # ---- several requests as one batch ------------------------------------------------------------------------
    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key as one batch: one encode, one denoise loop, one decode. Each request
        keeps its own seed (its noise is its own draw, as alone)."""
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        first = batch[0]
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives(batch)
        h, w = self.latent_grid(first.height, first.width)  # type: ignore[arg-type]
        with timer.stage("encode"):
            use_cfg = self.uses_cfg(first)
            embeds = self.encode_prompt(prompts + (negatives if use_cfg else []), first.max_sequence_length)  # type: ignore[arg-type]
            text_ids = position_ids(0, 1, 1, embeds.shape[1], self.device)
            cond = (embeds[: len(prompts)], text_ids)
            uncond = (embeds[len(prompts) :], text_ids) if use_cfg else None
            references = self.encode_references(first.images) if first.images else None
        with timer.stage("prepare"):
            latents = torch.cat(
                [self.prepare_latents(p.seed, n, p.height, p.width) for p, n in zip(batch, counts)]  # type: ignore[arg-type]
            )
            latent_ids = position_ids(0, h, w, 1, self.device)
        with timer.stage("denoise"):
            latents = self.denoise(latents, latent_ids, cond, uncond, references, first, timer, on_step)
        with timer.stage("decode"):
            images = self.decode(latents, first.height, first.width, first.output_type)  # type: ignore[arg-type]
        timings = {**timer.summary(), "batch_size": len(batch)}
        outputs, start = [], 0
        for n in counts:
            outputs.append(PipelineOutput(images=images[start : start + n], timings=dict(timings)))
            start += n
        return outputs

    # ---- benchmarks and parity checks --------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inputs(self, height: int, width: int) -> dict:
        defaults = self.defaults()
        embeds = self.encode_prompt([BENCH_PROMPT], defaults.max_sequence_length)  # type: ignore[arg-type]
        h, w = self.latent_grid(height, width)
        guidance = None
        if self.c.transformer.config.guidance_embeds:
            guidance = torch.full((1,), defaults.guidance_scale, device=self.device, dtype=torch.float32)  # type: ignore[arg-type]
        return dict(
            hidden_states=self.prepare_latents(0, 1, height, width),
            encoder_hidden_states=embeds,
            timestep=torch.full((1,), 0.7, device=self.device, dtype=self.dtype),
            img_ids=position_ids(0, h, w, 1, self.device),
            txt_ids=position_ids(0, 1, 1, embeds.shape[1], self.device),
            guidance=guidance,
        )

    def diffusers_parts(self) -> dict:
        return dict(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            transformer=diffusers_transformer_sharing(self.c.transformer),
        )

    def diffusers_pipeline(self):
        from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline

        pipe = DiffusersFlux2Pipeline(**self.diffusers_parts())
        pipe.set_progress_bar_config(disable=True)
        return pipe


class Flux2KleinPipeline(Flux2Pipeline):
    """FLUX.2 [klein]: Qwen3 text embeddings, no guidance embedding, true CFG unless step-distilled."""

    text_encoder_out_layers = (9, 18, 27)

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipeline_config.get("is_distilled", False))

    def check_guidance(self, params: SamplingParams) -> None:
        if params.true_cfg_scale not in (None, 1, 1.0):
            raise ConfigError(
                "true_cfg_scale",
                "FLUX.2 [klein] has one guidance scale: use guidance_scale (CFG when > 1, unless the model is "
                "step-distilled)",
            )

    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.guidance_scale > 1 and not self.is_distilled  # type: ignore[operator]

    def guidance(self, params: SamplingParams, batch: int) -> torch.Tensor | None:
        return None

    def chat_inputs(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        texts = [
            self.c.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]
        return self.c.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_sequence_length
        )

    def latent_output(self, tokens: torch.Tensor, height: int, width: int) -> list:
        """[klein] the VAE's latents (denormalised and unpatchified), as diffusers' Flux2KleinPipeline."""
        return list(self.denormalize(tokens, height, width))

    def diffusers_pipeline(self):
        from diffusers import Flux2KleinPipeline as DiffusersFlux2KleinPipeline

        pipe = DiffusersFlux2KleinPipeline(**self.diffusers_parts(), is_distilled=self.is_distilled)
        pipe.set_progress_bar_config(disable=True)
        return pipe
