"""Wan text-to-video: UMT5 states → patch tokens → UniPC (flow) multistep → Wan VAE decode.

Wan2.1 runs one transformer; Wan2.2 A14B two experts of the same architecture: `transformer` while the timestep is at
or above boundary_ratio · num_train_timesteps (model_index.json's boundary_ratio), `transformer_2` after, each with
its CFG scale (guidance_scale, then guidance_scale_2, which defaults to guidance_scale), as diffusers switches them.
Wan2.2 TI2V-5B (model_index.json's expand_timesteps) has diffusers hand the DiT one timestep per token; for text to
video they are all the step's t, so the DiT gets the one t per sample (the same arithmetic, without a [B, N, 6, dim]
modulation per token).

Every stage reproduces diffusers' WanPipeline (0.42.1) step for step, so that the same folder and seed give the same
frames: the same prompt cleaning (ftfy's fix_text when ftfy is installed, as diffusers checks; then HTML unescaping
twice and whitespace collapsing), UMT5's last hidden states with the padding zeroed and the text padded to
max_sequence_length with zeros (the DiT attends to those zero rows too), the same noise draw (float32 on the CPU
generator), the scheduler's own timesteps, CFG in the model's dtype as uncond + g·(cond − uncond) whenever
guidance_scale > 1, and the same un-normalisation (latents · std + mean) and decode. Only the DiT is ours.

What diffusers does inside its transformer (the Conv3d patch embedding's patchify, the RoPE grid) happens here, so
the DiT takes patch tokens and their positions. The text encoder runs on the batch padded to its longest prompt
instead of max_sequence_length: UMT5's attention masks padded keys, so the real tokens' states are the same up to
float rounding (the DiT still sees max_sequence_length rows, zeros past each prompt).

Image to video, as diffusers' WanImageToVideoPipeline (the same class of folder served here, and a TI2V folder with
or without an image): the image resized and normalised by diffusers' VideoProcessor, VAE-encoded (the latent
distribution's mode) and normalised, then
- Wan2.1 I2V and Wan2.2 I2V-A14B (a DiT whose in_channels exceed the VAE's latent channels): the image followed by
  black frames encoded as a video, beside a mask of the first frame, concatenated to the noisy latents on every step;
  Wan2.1 I2V also attends to CLIP's penultimate hidden states of the image (CLIPImageProcessor, CLIPVisionModel);
- Wan2.2 TI2V-5B (expand_timesteps): the image's latent frame replaces the first latent frame on every step and at
  the end, and its tokens get timestep 0 (per-token timesteps).
Input images are turned into PNG data URIs when the request is resolved, so a request stays plain data (it crosses
process boundaries as JSON); RGB conversion is the only change to their pixels.

Requests may ask for `output_type` "pil" (the default: each video a `utils.video.Video`, a uint8 array T×H×W×3 with
the request's fps that saves itself as MP4, the frames diffusers' output_type="np" gives, scaled as its
`export_to_video` scales them), "np" (those float frames in [0, 1]) or
"latent" (the latents [C, T', H', W']).
"""

from __future__ import annotations

import copy
import html
import importlib.util
import math
from dataclasses import dataclass, fields

import numpy as np
import regex
import torch
import torch.distributed as dist
from torch import nn

from ditserve.config import ConfigError, SamplingParams
from ditserve.models.wan import WanTransformer, to_diffusers_state_dict, video_position_ids
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
from ditserve.pipelines.rcm import DEFAULT_SIGMA_MAX, RCMScheduler
from ditserve.pipelines.rcm import MAX_STEPS as RCM_MAX_STEPS
from ditserve.utils.timing import StageTimer
from ditserve.utils.video import Video

DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 832  # diffusers' WanPipeline.__call__ defaults
DIFFUSERS_SIDE_MULTIPLE = 16  # diffusers' check_inputs refuses sides that do not divide by 16


@dataclass
class WanComponents:
    """What families/wan.py lists, loaded by `loader.folder.load_components`."""

    transformer: WanTransformer
    vae: nn.Module  # diffusers' AutoencoderKLWan
    text_encoder: nn.Module  # transformers' UMT5EncoderModel
    tokenizer: object  # T5TokenizerFast (google/umt5-xxl's)
    scheduler: object  # UniPCMultistepScheduler with flow sigmas
    transformer_2: WanTransformer | None = None  # Wan2.2 A14B's low-noise expert
    image_encoder: nn.Module | None = None  # Wan2.1 I2V: transformers' CLIPVisionModel
    image_processor: object | None = None  # Wan2.1 I2V: CLIPImageProcessor


# ---- prompt cleaning, as diffusers' pipeline_wan does it ---------------------------------------------------------
def _fix_text():
    """ftfy.fix_text when ftfy is installed (diffusers cleans with it then, and only then), else None."""
    if importlib.util.find_spec("ftfy") is None:
        return None
    import ftfy

    return ftfy.fix_text


def prompt_clean(text: str) -> str:
    """ftfy (if installed), HTML entities unescaped twice, whitespace runs collapsed to one space, ends stripped."""
    fix = _fix_text()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()  # diffusers' `regex` module: Unicode White_Space, as there


# ---- the token layout diffusers' WanTransformer3DModel builds inside its forward --------------------------------
def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] → [B, (F/pt)(H/ph)(W/pw), C·pt·ph·pw]: tokens frames-slowest, each token's values in the order
    of the Conv3d weight (channels slowest)."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.view(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """The DiT's output tokens [B, N, pt·ph·pw·C] (channels fastest, as diffusers' proj_out writes them) over a
    (F', H', W') token grid → [B, C, F'·pt, H'·ph, W'·pw]."""
    b = tokens.shape[0]
    (f, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, f * pt, h * ph, w * pw)


# ---- input images ---------------------------------------------------------------------------------------------
class WanPipeline(Pipeline):
    components_class = WanComponents
    c: WanComponents
    request_attention = True

    def __init__(self, spec, components: WanComponents, device, dtype, sampling_defaults: dict | None = None):
        from diffusers.video_processor import VideoProcessor

        super().__init__(spec, components, device, dtype, sampling_defaults)
        vae = components.vae.config
        self.vae_scale_temporal = vae.scale_factor_temporal
        self.vae_scale_spatial = vae.scale_factor_spatial
        self.latent_channels = vae.z_dim
        self.patch = tuple(components.transformer.config.patch_size)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_spatial)

    @property
    def image_mode(self) -> str | None:
        """How this model takes an input image: "concat" (its DiT reads the image's latents and mask beside the noisy
        latents: Wan2.1 I2V, Wan2.2 I2V-A14B; the image is required), "first_frame" (the image's latents are the
        first latent frame: Wan2.2 TI2V; optional), or None (text to video only)."""
        if self.c.transformer.config.in_channels != self.latent_channels:
            return "concat"
        return "first_frame" if self.pipeline_config.get("expand_timesteps") else None

    @property
    def tasks(self) -> tuple[str, ...]:
        """An image-to-video folder needs the image, a TI2V folder takes one or none, a text-to-video folder none."""
        mode = self.image_mode
        if mode == "concat":
            return ("image-to-video",)
        return ("text-to-video", "image-to-video") if mode == "first_frame" else ("text-to-video",)

    @property
    def boundary_ratio(self) -> float | None:
        """Where the second expert takes over, as a fraction of the training timesteps (None: one transformer)."""
        ratio = self.pipeline_config.get("boundary_ratio")
        return None if ratio is None or self.c.transformer_2 is None else float(ratio)

    # ---- defaults and validation: diffusers' WanPipeline.__call__'s (the spec's), unless the folder names its own
    @property
    def default_side(self) -> int:
        return DEFAULT_HEIGHT

    def defaults(self) -> SamplingParams:
        params = SamplingParams(height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, **self.spec.sampling_defaults)
        if self.pipeline_config.get("sampler") == "rcm":  # TurboWan: TurboDiffusion's 4 steps, no CFG
            params = params.replace(num_inference_steps=RCM_MAX_STEPS, guidance_scale=1.0)
        return params.replace(**self.sampling_defaults)

    @property
    def spatial_multiple(self) -> int:
        """Sides divide by 16 (diffusers' check) and by the VAE's factor times the patch (diffusers rounds them down
        to that with a warning; ditserve refuses them instead)."""
        _, ph, pw = self.patch
        return math.lcm(DIFFUSERS_SIDE_MULTIPLE, self.vae_scale_spatial * ph, self.vae_scale_spatial * pw)

    def resolve(self, params: SamplingParams) -> SamplingParams:
        if params.true_cfg_scale not in (None, 1, 1.0):
            raise ConfigError(
                "true_cfg_scale",
                "Wan has one guidance scale: use guidance_scale (CFG with the negative prompt when > 1, as diffusers' "
                "WanPipeline)",
            )
        if params.guidance_scale_2 is not None and self.c.transformer_2 is not None and self.boundary_ratio is None:
            raise ConfigError("guidance_scale_2", "this folder's model_index.json sets no boundary_ratio")
        images = params.images or []
        if images and self.image_mode is None:
            raise ConfigError(
                "images", "this Wan model makes videos from text only (an image-to-video or TI2V model takes one)"
            )
        if not images and self.image_mode == "concat":
            raise ConfigError(
                "images", "this Wan image-to-video model needs an input image (images: [the first frame])"
            )
        sampler = self.pipeline_config.get("sampler")  # the folder's own default (TurboWan: rcm)
        if sampler and params.sampling_preset is None and "sampler" not in (params.options or {}):
            params = params.replace(options={**(params.options or {}), "sampler": sampler})
        resolved = super().resolve(params)
        _check_sampler(resolved.options or {}, resolved.num_inference_steps)  # type: ignore[arg-type]
        if images:
            resolved = resolved.replace(images=[as_data_uri(image) for image in images])
        frames, step = resolved.num_frames, self.vae_scale_temporal
        below = (frames - 1) // step * step + 1  # type: ignore[operator]
        if frames != below:
            raise ConfigError(
                "num_frames",
                f"must be {step}·k + 1 (the VAE packs {step} frames after the first into each latent frame): "
                f"{below} or {below + step}, not {frames}",
            )
        return resolved

    def batch_key(self, params: SamplingParams) -> tuple:
        """The batch's clips share the first request's frame rate, and its way of taking an image."""
        return (*super().batch_key(params), params.fps, bool(params.images))

    # ---- stages -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """Wan2.1 I2V: CLIP's second-to-last hidden states of the image [1, 257, image_dim], in the model's dtype."""
        inputs = self.c.image_processor(images=image, return_tensors="pt").to(self.device)
        return self.c.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].to(self.dtype)

    @torch.no_grad()
    def image_condition(
        self, image, batch: int, num_frames: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image's part of the DiT input, float32, for `batch` samples: "concat" mode → ([B, 4 + C, T', h, w]
        (the first frame's mask, then the latents of the image followed by black frames), None); "first_frame" mode
        → ([B, C, 1, h, w] (the image's latent frame), mask [1, 1, T', h, w] (0 on the first frame, 1 after))."""
        vae = self.c.vae
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        video = pixels.unsqueeze(2)
        if self.image_mode == "concat":
            black = video.new_zeros(video.shape[0], video.shape[1], num_frames - 1, height, width)
            video = torch.cat([video, black], dim=2)
        latent = vae.encode(video.to(vae.dtype)).latent_dist.mode().to(self.device, torch.float32)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latent.device, latent.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latent.device, latent.dtype)
        latent = ((latent - mean) * inverse_std).repeat(batch, 1, 1, 1, 1)
        _, frames, h, w = self.latent_shape(num_frames, height, width)
        step = self.vae_scale_temporal
        if self.image_mode == "first_frame":
            mask = torch.ones(1, 1, frames, h, w, dtype=torch.float32, device=self.device)
            mask[:, :, 0] = 0
            return latent, mask
        # One mask channel per frame the VAE packs into a latent frame: the first latent frame holds the image alone
        # (its mask repeated), each later one `step` black frames.
        per_frame = torch.zeros(batch, 1, num_frames, h, w, dtype=torch.float32, device=self.device)
        per_frame[:, :, 0] = 1
        per_frame = torch.cat([per_frame[:, :, :1].repeat_interleave(step, dim=2), per_frame[:, :, 1:]], dim=2)
        mask = per_frame.view(batch, -1, step, h, w).transpose(1, 2)
        return torch.cat([mask, latent], dim=1), None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """[len(prompts), max_sequence_length, text_dim] in the model's dtype: UMT5's last hidden states of each
        cleaned prompt, zeros past its tokens. Prompts that repeat are encoded once."""
        unique = list(dict.fromkeys(prompts))
        inputs = self.c.tokenizer(
            [prompt_clean(p) for p in unique],
            padding="longest",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        hidden = self.c.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        embeds = hidden.new_zeros(len(unique), max_sequence_length, hidden.shape[-1])
        for i, n in enumerate(lengths):
            embeds[i, :n] = hidden[i, :n]
        index = {p: i for i, p in enumerate(unique)}
        return embeds[[index[p] for p in prompts]].to(self.dtype)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (
            self.latent_channels,
            (num_frames - 1) // self.vae_scale_temporal + 1,
            height // self.vae_scale_spatial,
            width // self.vae_scale_spatial,
        )

    def prepare_latents(self, seed: int, batch: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Noise as diffusers draws it: float32 whatever the model's dtype (the scheduler steps in float32)."""
        shape = (batch, *self.latent_shape(num_frames, height, width))
        return seeded_noise(shape, seed, torch.float32, self.device)

    def make_scheduler(self, num_steps: int, options: dict | None = None):
        """A fresh scheduler per request (UniPC keeps the previous outputs of its multistep): the folder's, or what
        the request's options name (`sampler`, `flow_shift`, `denoising_steps`; checked in `resolve`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        options = options or {}
        if options.get("sampler") == "rcm":
            # the request's, else the folder's (TurboWan2.2 I2V: 200, as its script), else TurboDiffusion's T2V 80
            sigma_max = options.get("sigma_max") or self.pipeline_config.get("sigma_max") or DEFAULT_SIGMA_MAX
            return RCMScheduler(num_steps, float(sigma_max), self.device)
        config = self.c.scheduler.config
        shift = options.get("flow_shift")
        if options.get("sampler", "unipc") == "euler":
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.num_train_timesteps,
                shift=float(shift if shift is not None else config.get("flow_shift", 1.0)),
            )
        else:
            overrides = {} if shift is None else {"flow_shift": float(shift)}
            scheduler = type(self.c.scheduler).from_config(config, **overrides)
        steps = options.get("denoising_steps")
        if steps:
            sigmas = [int(t) / config.num_train_timesteps for t in steps.split(",")]
            scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        else:
            scheduler.set_timesteps(num_steps, device=self.device)
        scheduler.set_begin_index(0)
        return scheduler

    def token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        f, h, w = latents.shape[-3:]
        pt, ph, pw = self.patch
        return f // pt, h // ph, w // pw

    def predict(
        self,
        model: WanTransformer,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance_scale: float,
        **inputs,
    ) -> torch.Tensor:
        """The model's prediction [B, C, F, H, W] in its dtype for the DiT input `latents` (the noisy latents, with
        an image's condition when there is one), guided when `uncond` is given; `inputs`: the DiT's other keyword
        arguments (token_timestep, image_states).

        With CFG parallelism the two branches run at once on the two halves of the ranks, and an all-gather gives
        every rank both predictions (so every rank takes the same scheduler step)."""
        grid = self.token_grid(latents)
        tokens = patchify(latents.to(self.dtype), self.patch)
        ids = video_position_ids(*grid, device=latents.device)

        def branch(text: torch.Tensor) -> torch.Tensor:
            out = model(tokens, timestep=timestep, text_states=text, video_ids=ids, token_grid=grid, **inputs)
            return unpatchify(out, grid, self.patch)

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
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        params: SamplingParams,
        timer: StageTimer,
        on_step: StepCallback | None,
        condition: torch.Tensor | None = None,
        first_frame_mask: torch.Tensor | None = None,
        image_states: torch.Tensor | None = None,
        noise_seeds: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """The denoising loop; `condition` and `first_frame_mask` from `image_condition`, `image_states` from
        `encode_image` (one row per sample); `noise_seeds`: (seed, samples) of each request of the batch, for
        samplers that draw noise on every step (rCM; default: the request's seed for all samples)."""
        scheduler = self.make_scheduler(params.num_inference_steps, params.options)  # type: ignore[arg-type]
        if isinstance(scheduler, RCMScheduler):
            seeds = noise_seeds or [(params.seed, latents.shape[0])]
            scheduler.seed_noise(seeds, tuple(latents.shape[1:]))  # type: ignore[arg-type]
            latents = scheduler.initial_latents(latents)
        timesteps = scheduler.timesteps
        guidance: float = params.guidance_scale  # type: ignore[assignment]
        guidance_2 = guidance if params.guidance_scale_2 is None else params.guidance_scale_2
        ratio = self.boundary_ratio
        boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
        for i, t in enumerate(timesteps):
            timer.step_begin()
            timestep = t.expand(latents.shape[0])
            # Under layerwise offload (accel/offload.py) both experts' blocks live on the host and share one ring of
            # device slots, filled at each block loop: the idle expert takes no device memory beyond its small
            # modules, and switching experts needs nothing here. Without it both experts stay on the device.
            if boundary is None or t >= boundary:
                model, scale = self.c.transformer, guidance
            else:
                model, scale = self.c.transformer_2, guidance_2
            inputs: dict = {} if image_states is None else {"image_states": image_states}
            if params.attention is not None:
                inputs["attention"] = params.attention
            if first_frame_mask is not None:  # the image's latent frame in place of the first, its tokens at t = 0
                model_input = (1 - first_frame_mask) * condition + first_frame_mask * latents
                pt, ph, pw = self.patch
                per_token = (first_frame_mask[0, 0, ::pt, ::ph, ::pw] * t).flatten()
                inputs["token_timestep"] = per_token.unsqueeze(0).expand(latents.shape[0], -1)
            elif condition is not None:
                model_input = torch.cat([latents, condition], dim=1)
            else:
                model_input = latents
            noise_pred = self.predict(model, model_input, timestep, cond, uncond, scale, **inputs)  # type: ignore[arg-type]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.step_end()
            if on_step is not None:
                on_step(i, len(timesteps))
        if first_frame_mask is not None:
            latents = (1 - first_frame_mask) * condition + first_frame_mask * latents
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str) -> list:
        if output_type == "latent":
            return list(latents)
        vae = self.c.vae
        x = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        z = x / inverse_std + mean
        if self.decode_group is not None and _vae_tiles(vae, z):
            video = tiled_decode_over_ranks(vae, z, self.decode_group)
        elif self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []  # one tile: rank 0 decodes it alone
        else:
            video = vae.decode(z, return_dict=False)[0]
        frames = self.video_processor.postprocess_video(video, output_type="np")  # [B, T, H, W, 3] in [0, 1]
        if output_type == "np":
            return list(frames)
        return [(f * 255).astype(np.uint8) for f in frames]  # as diffusers' export_to_video

    # ---- several requests as one batch ------------------------------------------------------------------------
    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key as one batch: one encode, one denoise loop, one decode. Each request
        keeps its own seed (its noise is its own draw, as alone)."""
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        first = batch[0]
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives(batch)
        with timer.stage("encode"):
            use_cfg = first.guidance_scale > 1.0  # type: ignore[operator]
            embeds = self.encode_prompt(prompts + (negatives if use_cfg else []), first.max_sequence_length)  # type: ignore[arg-type]
            cond, uncond = embeds[: len(prompts)], (embeds[len(prompts) :] if use_cfg else None)
        images = [load_image(p.images[0]) if p.images else None for p in batch]
        image_states = None
        if images[0] is not None and self.c.transformer.config.image_dim is not None:
            with timer.stage("encode"):
                image_states = torch.cat([self.encode_image(im).expand(n, -1, -1) for im, n in zip(images, counts)])
        with timer.stage("prepare"):
            latents = torch.cat(
                [self.prepare_latents(p.seed, n, p.num_frames, p.height, p.width) for p, n in zip(batch, counts)]  # type: ignore[arg-type]
            )
            condition = first_frame_mask = None
            if images[0] is not None:
                parts = [
                    self.image_condition(im, n, p.num_frames, p.height, p.width)  # type: ignore[arg-type]
                    for im, p, n in zip(images, batch, counts)
                ]
                condition, first_frame_mask = torch.cat([c for c, _ in parts]), parts[0][1]
        with timer.stage("denoise"):
            latents = self.denoise(
                latents,
                cond,
                uncond,
                first,
                timer,
                on_step,
                condition,
                first_frame_mask,
                image_states,
                noise_seeds=[(p.seed, n) for p, n in zip(batch, counts)],  # type: ignore[misc]
            )
        with timer.stage("decode"):
            videos = self.decode(latents, first.output_type)
            if first.output_type == "pil":  # uint8 clips that save themselves (utils/video.py), at the request's fps
                videos = [Video(v, fps=first.fps) for v in videos]  # type: ignore[arg-type]
        timings = {**timer.summary(), "batch_size": len(batch)}
        outputs, start = [], 0
        for n in counts:
            outputs.append(PipelineOutput(images=[], videos=videos[start : start + n], timings=dict(timings)))
            start += n
        return outputs

    # ---- for benchmarks and parity checks ------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inputs(
        self, height: int, width: int, prompt: str = BENCH_PROMPT, num_frames: int | None = None
    ) -> dict:
        """Keyword arguments of one DiT forward at batch 1 for a fixed prompt at this size (the default frame count
        unless given), at a mid-schedule timestep; image-to-video models get the condition of a grey first frame."""
        from PIL import Image

        defaults = self.defaults()
        frames: int = num_frames or defaults.num_frames  # type: ignore[assignment]
        latents = self.prepare_latents(0, 1, frames, height, width)
        inputs: dict = {}
        if self.image_mode == "concat":
            grey = Image.new("RGB", (width, height), (128, 128, 128))
            latents = torch.cat([latents, self.image_condition(grey, 1, frames, height, width)[0]], dim=1)
            if self.c.transformer.config.image_dim is not None:
                inputs["image_states"] = self.encode_image(grey)
        return dict(
            video_tokens=patchify(latents.to(self.dtype), self.patch),
            timestep=torch.full((1,), 500.0, device=self.device),
            text_states=self.encode_prompt([prompt], defaults.max_sequence_length),  # type: ignore[arg-type]
            video_ids=video_position_ids(*self.token_grid(latents), device=self.device),
            token_grid=self.token_grid(latents),
            **inputs,
        )

    def diffusers_forward_inputs(self, inputs: dict) -> dict:
        """The same forward in diffusers' form: the latents [B, C, F, H, W] rebuilt from the tokens."""
        grid = tuple(int(inputs["video_ids"][:, axis].max()) + 1 for axis in range(3))
        b, n = inputs["video_tokens"].shape[:2]
        pt, ph, pw = self.patch
        f, h, w = grid
        x = inputs["video_tokens"].view(b, f, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return dict(
            hidden_states=x.reshape(b, -1, f * pt, h * ph, w * pw),
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["text_states"],
            encoder_hidden_states_image=inputs.get("image_states"),
        )

    def comparable_outputs(self, ours: torch.Tensor, theirs, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both as latents [B, C, F, H, W]: ours unpatchified."""
        grid = tuple(int(inputs["video_ids"][:, axis].max()) + 1 for axis in range(3))
        return unpatchify(ours, grid, self.patch), theirs[0]  # type: ignore[arg-type]

    def diffusers_transformer(self, model: WanTransformer):
        """diffusers' WanTransformer3DModel holding our DiT's tensors (no copy)."""
        from diffusers import WanTransformer3DModel

        cfg = model.config
        # WanConfig's fields are diffusers' config names, so the config passes through as is.
        config = {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in fields(cfg)}
        shared = diffusers_model_sharing(WanTransformer3DModel, config, to_diffusers_state_dict(model))
        # Its RoPE tables are buffers outside the state dict, left on the meta device: built again for real.
        rope = shared.rope
        shared.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len).to(self.device)
        return shared

    def diffusers_pipeline(self):
        """diffusers' WanPipeline (WanImageToVideoPipeline for image-to-video models) on our components, its
        transformers holding our DiTs' tensors (no copy)."""
        import diffusers

        second = self.c.transformer_2
        common = dict(
            tokenizer=self.c.tokenizer,
            text_encoder=self.c.text_encoder,
            vae=self.c.vae,
            scheduler=copy.deepcopy(self.c.scheduler),
            transformer=self.diffusers_transformer(self.c.transformer),
            transformer_2=self.diffusers_transformer(second) if second is not None else None,
            boundary_ratio=self.boundary_ratio,
            expand_timesteps=bool(self.pipeline_config.get("expand_timesteps")),
        )
        if self.image_mode == "concat":
            pipe = diffusers.WanImageToVideoPipeline(
                image_encoder=self.c.image_encoder, image_processor=self.c.image_processor, **common
            )
        else:
            pipe = diffusers.WanPipeline(**common)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _check_sampler(options: dict, num_steps: int) -> None:
    sampler, shift, steps = options.get("sampler"), options.get("flow_shift"), options.get("denoising_steps")
    if sampler not in ("unipc", "euler", "rcm"):
        raise ConfigError("options.sampler", f"must be 'unipc', 'euler' or 'rcm', got {sampler!r}")
    sigma_max = options.get("sigma_max")
    if sampler == "rcm":
        if not 1 <= num_steps <= RCM_MAX_STEPS:
            raise ConfigError("num_inference_steps", f"rCM (options.sampler 'rcm') takes 1 to {RCM_MAX_STEPS} steps")
        if shift is not None or steps is not None:
            name = "flow_shift" if shift is not None else "denoising_steps"
            raise ConfigError(f"options.{name}", "rCM has its own times; set options.sigma_max instead")
        if sigma_max is not None and (
            isinstance(sigma_max, bool) or not isinstance(sigma_max, int | float) or not 0 < sigma_max <= 1e5
        ):
            raise ConfigError("options.sigma_max", f"must be a number in (0, 1e5], got {sigma_max!r}")
        return
    if sigma_max is not None:
        raise ConfigError("options.sigma_max", "is rCM's setting: use it with options.sampler 'rcm'")
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 < shift <= 100):
        raise ConfigError(
            "options.flow_shift", f"must be a number in (0, 100], or null for the folder's, got {shift!r}"
        )
    if steps is None:
        return
    if sampler != "euler":
        raise ConfigError("options.denoising_steps", "needs options.sampler 'euler' (UniPC takes its own timesteps)")
    parts = steps.split(",") if isinstance(steps, str) else []
    if not parts or not all(p.strip().isdigit() and 0 < int(p) <= 1000 for p in parts):
        raise ConfigError(
            "options.denoising_steps",
            f"must be comma-separated timesteps in 1..1000, e.g. '1000,750,500,250', got {steps!r}",
        )
    values = [int(p) for p in parts]
    if values != sorted(set(values), reverse=True):
        raise ConfigError("options.denoising_steps", f"must decrease strictly, got {steps!r}")
    if len(values) != num_steps:
        raise ConfigError(
            "options.denoising_steps", f"names {len(values)} timesteps for {num_steps} steps (num_inference_steps)"
        )


# ---- the VAE decode with its tiles shared out over the ranks ------------------------------------------------------
def _vae_tiles(vae, z: torch.Tensor) -> bool:
    """diffusers' AutoencoderKLWan rule: tile when tiling is on and the latent is wider or taller than one tile."""
    ratio = vae.spatial_compression_ratio
    return bool(vae.use_tiling) and (
        z.shape[-1] > vae.tile_sample_min_width // ratio or z.shape[-2] > vae.tile_sample_min_height // ratio
    )


def tiled_decode_over_ranks(vae, z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`AutoencoderKLWan.tiled_decode` with its spatial tiles shared out over the group's ranks.

    The tiles are cut as diffusers cuts them (each over all frames, decoded frame by frame through the VAE's causal
    feature cache); each rank decodes every world-th tile, one all-gather gives every rank every tile (padded to a
    full tile), and the seams are blended with the VAE's own blend_v/blend_h. Each tile is decoded alone whichever
    rank decodes it, so the result is the one-process tiled decode."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    _, _, frames, height, width = z.shape
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
    tile_h, tile_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    stride_h, stride_w = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
    out_stride_h, out_stride_w = vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch
    blend_h = vae.tile_sample_min_height // patch - out_stride_h
    blend_w = vae.tile_sample_min_width // patch - out_stride_w
    scale = ratio // patch  # decoder output pixels (before unpatchifying) per latent pixel
    rows, cols = list(range(0, height, stride_h)), list(range(0, width, stride_w))
    positions = [(i, j) for i in rows for j in cols]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)

    def decode(i: int, j: int) -> torch.Tensor:
        vae.clear_cache()
        pieces = []
        for k in range(frames):
            vae._conv_idx = [0]
            tile = vae.post_quant_conv(z[:, :, k : k + 1, i : i + tile_h, j : j + tile_w])
            pieces.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0))
        vae.clear_cache()
        return torch.cat(pieces, dim=2)

    if world == 1:
        decoded = [decode(i, j) for i, j in positions]
    else:
        mine = None
        for slot, (i, j) in enumerate(positions[rank::world]):
            out = decode(i, j)
            if mine is None:  # [slot, B, C, T, full tile h, full tile w]: one all-gather moves every tile
                per_rank = math.ceil(len(positions) / world)
                mine = out.new_zeros((per_rank, *out.shape[:3], tile_h * scale, tile_w * scale))
            mine[slot, ..., : out.shape[3], : out.shape[4]] = out
        if mine is None:  # more ranks than tiles: this rank's share is empty, its slot shaped as the others'
            probe = decode(0, 0)
            mine = probe.new_zeros((1, *probe.shape[:3], tile_h * scale, tile_w * scale))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        decoded = []
        for n, (i, j) in enumerate(positions):
            h, w = min(tile_h, height - i) * scale, min(tile_w, width - j) * scale
            decoded.append(gathered[n % world][n // world, ..., :h, :w].clone())

    grid = [decoded[r * len(cols) : (r + 1) * len(cols)] for r in range(len(rows))]
    result_rows = []
    for r, row in enumerate(grid):
        pieces = []
        for c, tile in enumerate(row):
            # blend_v/blend_h write into the tile: later tiles meet it blended, as in diffusers
            if r > 0:
                tile = vae.blend_v(grid[r - 1][c], tile, blend_h)
            if c > 0:
                tile = vae.blend_h(row[c - 1], tile, blend_w)
            pieces.append(tile[:, :, :, :out_stride_h, :out_stride_w])
        result_rows.append(torch.cat(pieces, dim=-1))
    video = torch.cat(result_rows, dim=3)[:, :, :, : height * scale, : width * scale]
    if vae.config.patch_size is not None:
        video = unpatchify(video, patch_size=vae.config.patch_size)
    return torch.clamp(video, min=-1.0, max=1.0)
