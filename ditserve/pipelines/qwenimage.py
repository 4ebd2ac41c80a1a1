"""Qwen-Image text-to-image: Qwen2.5-VL hidden states → packed latents → flow-matching Euler → Qwen-Image VAE decode.

Every stage reproduces diffusers' QwenImagePipeline (0.42.1) step for step, so that the same folder and seed give
the same image: the same prompt template and the same 34 template tokens dropped from the front of the encoder's
last hidden states, the padding dropped per prompt and each branch's prompts padded to its longest again with a
mask (none when every prompt of the branch is as long), the same noise draw (in the model's dtype, packed 2×2), the
same sigmas (linspace(1, 1/n, n) through the scheduler's exponential dynamic shift), true CFG exactly as diffusers
does it (positive and negative as separate forwards, neg + s·(pos − neg) rescaled per token to the positive's norm,
only with a negative prompt and true_cfg_scale > 1), the same decode. Only the DiT is ours.

Position ids: diffusers' transformer builds its RoPE from `img_shapes`; here the pipeline gives it the ids: image
tokens (frame, row − ⌈h/2⌉, col − ⌈w/2⌉) per image (the frame is the image's index: the edit pipelines put the
reference images after the noisy one), text tokens on the diagonal starting at the largest half extent.
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
from ditserve.models.qwenimage import QwenImageTransformer, to_diffusers_state_dict
from ditserve.pipelines.base import (
    BENCH_PROMPT,
    Pipeline,
    PipelineOutput,
    StepCallback,
    diffusers_model_sharing,
    prompts_with_negatives,
    seeded_noise,
)
from ditserve.pipelines.flux import calculate_shift, pack_latents, unpack_latents
from ditserve.pipelines.input_images import image_data_uri, load_image
from ditserve.utils.timing import StageTimer

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34  # the template's tokens before the prompt, dropped from the hidden states (diffusers' drop_idx)
TOKENIZER_MAX_LENGTH = 1024  # prompt tokens after the template (diffusers' tokenizer_max_length)
BENCH_TEXT_TOKENS = 256  # the text length of `forward_inputs` (the speed target's)


@dataclass
class QwenImageComponents:
    transformer: QwenImageTransformer
    vae: nn.Module  # diffusers' AutoencoderKLQwenImage
    text_encoder: nn.Module  # transformers' Qwen2_5_VLForConditionalGeneration
    tokenizer: object
    scheduler: object


@dataclass
class TextBatch:
    """One CFG branch's text for the DiT: embeddings padded to the branch's longest prompt, and the mask of the
    real tokens (None when none is padded, as diffusers drops an all-true mask)."""

    embeds: torch.Tensor  # [B, L, hidden]
    mask: torch.Tensor | None  # [B, L] bool

    @classmethod
    def stack(cls, embeds: list[torch.Tensor]) -> TextBatch:
        longest = max(e.shape[0] for e in embeds)
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        if all(e.shape[0] == longest for e in embeds):
            return cls(padded, None)
        mask = torch.stack([torch.arange(longest, device=e.device) < e.shape[0] for e in embeds])
        return cls(padded, mask)


def image_position_ids(
    grids: list[tuple[int, int]], device: torch.device, frames: list[int] | None = None
) -> torch.Tensor:
    """[Σ h·w, 3] ids of the packed tokens of each image (h × w tokens), image i on frame i (or frames[i]), rows and
    columns centred (diffusers' scale_rope: positions −⌈h/2⌉ … ⌊h/2⌋ − 1)."""
    parts = []
    for frame, (h, w) in zip(frames if frames is not None else range(len(grids)), grids):
        rows = torch.arange(h, device=device) - (h - h // 2)
        cols = torch.arange(w, device=device) - (w - w // 2)
        ids = torch.empty(h, w, 3, dtype=torch.int64, device=device)
        ids[..., 0] = frame
        ids[..., 1] = rows[:, None]
        ids[..., 2] = cols[None, :]
        parts.append(ids.reshape(h * w, 3))
    return torch.cat(parts)


def text_position_ids(
    grids: list[tuple[int, int]], length: int, device: torch.device, min_start: int = 0
) -> torch.Tensor:
    """[length, 3] ids of the text tokens: the same position on every axis, from the largest half extent on (at
    least `min_start`: Layered's layer count)."""
    start = max(min_start, *(max(h // 2, w // 2) for h, w in grids))
    return (torch.arange(length, device=device, dtype=torch.int64) + start)[:, None].expand(length, 3).contiguous()


def diffusers_transformer_sharing(ours: QwenImageTransformer) -> nn.Module:
    """diffusers' QwenImageTransformer2DModel holding our tensors (no copy)."""
    from diffusers import QwenImageTransformer2DModel

    # QwenImageConfig's fields are diffusers' config names, so the config passes through as is.
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope

    config = {**dataclasses.asdict(ours.config), "axes_dims_rope": list(ours.config.axes_dims_rope)}
    model = diffusers_model_sharing(QwenImageTransformer2DModel, config, to_diffusers_state_dict(ours))
    # Its RoPE tables are plain attributes (no buffers), left empty on the meta device: made again for real.
    rope = QwenEmbedLayer3DRope if ours.config.use_layer3d_rope else QwenEmbedRope
    model.pos_embed = rope(theta=10000, axes_dim=list(ours.config.axes_dims_rope), scale_rope=True)
    return model


class QwenImagePipeline(Pipeline):
    components_class = QwenImageComponents
    c: QwenImageComponents

    def __init__(self, spec, components, device, dtype, sampling_defaults: dict | None = None):
        from diffusers.image_processor import VaeImageProcessor

        super().__init__(spec, components, device, dtype, sampling_defaults)
        self.vae_scale_factor = 2 ** len(components.vae.config.temperal_downsample)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.latent_channels = components.transformer.config.in_channels // 4

    @property
    def default_side(self) -> int:
        return 128 * self.vae_scale_factor  # diffusers' default_sample_size × vae_scale_factor

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def max_sequence_length_limit(self) -> int:
        return TOKENIZER_MAX_LENGTH  # diffusers refuses more

    def resolve(self, params: SamplingParams) -> SamplingParams:
        if params.guidance_scale is not None:
            raise ConfigError(
                "guidance_scale",
                "Qwen-Image is not guidance-distilled: its CFG scale is true_cfg_scale (CFG runs with a negative "
                "prompt and true_cfg_scale > 1, as diffusers' QwenImagePipeline)",
            )
        return super().resolve(params)

    # ---- stages -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        """One [tokens, hidden] embedding per prompt: the encoder's last hidden states of the templated prompt,
        padding and the template's first 34 tokens dropped, at most max_sequence_length kept. Prompts that repeat
        are encoded once (the encoder is causal and right-padded: each row's result is its own)."""
        unique = list(dict.fromkeys(prompts))
        inputs = self.c.tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in unique],
            max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        hidden = self.c.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        by_text = {
            p: hidden[i][mask[i].bool()][TEMPLATE_TOKENS:][:max_sequence_length].to(self.dtype)
            for i, p in enumerate(unique)
        }
        return [by_text[p] for p in prompts]

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The latent's height and width (even: the DiT takes 2×2 patches)."""
        return 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

    def prepare_latents(self, seed: int, batch: int, height: int, width: int) -> torch.Tensor:
        """Packed noise [batch, (h/2)(w/2), 4C], drawn as diffusers draws it: [batch, 1, C, h, w] in the model's
        dtype."""
        h, w = self.latent_grid(height, width)
        noise = seeded_noise((batch, 1, self.latent_channels, h, w), seed, self.dtype, self.device)
        return pack_latents(noise[:, 0])

    def make_scheduler(self, num_steps: int, image_seq_len: int):
        """A fresh scheduler per request (it keeps a step index), set to diffusers' Qwen-Image sigma schedule."""
        scheduler = type(self.c.scheduler).from_config(self.c.scheduler.config)
        cfg = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def dit_inputs(self, text: TextBatch, grids: list[tuple[int, int]]) -> dict:
        """The DiT's keyword arguments besides the image tokens and the timestep."""
        config = self.c.transformer.config
        frames, min_start = None, 0
        if config.use_layer3d_rope:  # Layered: layers on frames 0, 1, ..., the input image on frame -1
            frames, min_start = [*range(len(grids) - 1), -1], len(grids) - 1
        inputs = dict(
            encoder_hidden_states=text.embeds,
            img_ids=image_position_ids(grids, self.device, frames),
            txt_ids=text_position_ids(grids, text.embeds.shape[1], self.device, min_start),
            text_mask=text.mask,
        )
        if config.use_additional_t_cond:  # diffusers' is_rgb: 0 for every sample
            inputs["additional_t_cond"] = torch.zeros(text.embeds.shape[0], dtype=torch.long, device=self.device)
        if self.c.transformer.config.zero_cond_t:  # the noisy image's tokens first, then the references'
            ids = inputs["img_ids"]
            inputs["reference_tokens"] = ids[:, 0] > 0
        return inputs

    def predict_noise(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict,
        uncond: dict | None,
        true_cfg_scale: float,
        image_len: int,
        rescale: bool = True,
    ) -> torch.Tensor:
        """The DiT's prediction for the first `image_len` tokens (the noisy image's; the edit pipelines append the
        reference images' tokens), with true CFG when `uncond` is given.

        With CFG parallelism the two branches run at once on the two halves of the ranks, and an all-gather gives
        every rank both predictions (so every rank takes the same scheduler step)."""

        def branch(inputs: dict) -> torch.Tensor:
            return self.c.transformer(tokens, timestep=timestep, **inputs)[:, :image_len]

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
        combined = negative + true_cfg_scale * (positive - negative)
        if not rescale:
            return combined
        # diffusers rescales each token's guided prediction to the norm of its positive one.
        cond_norm = torch.norm(positive, dim=-1, keepdim=True)
        noise_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (cond_norm / noise_norm)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        cond: dict,
        uncond: dict | None,
        params: SamplingParams,
        timer: StageTimer,
        on_step: StepCallback | None,
        reference: torch.Tensor | None = None,
        scheduler=None,
        rescale: bool = True,
    ) -> torch.Tensor:
        """The Euler loop on packed latents [B, N, 4C]; `reference` [B, M, 4C] (edit pipelines) is appended to the
        image tokens of every forward. `scheduler`: one already set (default: `make_scheduler`'s); `rescale`: the
        guided prediction rescaled to the positive's norm (see `predict_noise`)."""
        if scheduler is None:
            scheduler = self.make_scheduler(params.num_inference_steps, latents.shape[1])  # type: ignore[arg-type]
        batch, image_len = latents.shape[0], latents.shape[1]
        for i, t in enumerate(scheduler.timesteps):
            timer.step_begin()
            timestep = t.expand(batch).to(latents.dtype) / 1000
            tokens = latents if reference is None else torch.cat([latents, reference], dim=1)
            noise_pred = self.predict_noise(tokens, timestep, cond, uncond, params.true_cfg_scale, image_len, rescale)  # type: ignore[arg-type]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.step_end()
            if on_step is not None:
                on_step(i, len(scheduler.timesteps))
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> list:
        if output_type == "latent":
            return list(latents)
        if self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []  # rank 0 decodes
        vae = self.c.vae
        h, w = self.latent_grid(height, width)
        x = unpack_latents(latents, h, w)[:, :, None].to(vae.dtype)  # [B, C, 1, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        image = vae.decode(x / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return list(self.image_processor.postprocess(image, output_type=output_type))

    # ---- several requests as one batch ------------------------------------------------------------------------
    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.negative_prompt is not None and params.true_cfg_scale > 1  # type: ignore[operator]

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key as one batch: one encode, one denoise loop, one decode.

        Each request keeps its own seed (its noise is its own draw, as alone). Each CFG branch's prompts are padded
        to its longest with a mask, so a prompt's image does not depend on the prompts beside it (up to float
        rounding)."""
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        first = batch[0]
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives(batch)
        use_cfg = self.uses_cfg(first)
        grid = tuple(s // 2 for s in self.latent_grid(first.height, first.width))  # type: ignore[arg-type]
        with timer.stage("encode"):
            embeds = self.encode_prompt(prompts + (negatives if use_cfg else []), first.max_sequence_length)  # type: ignore[arg-type]
            cond = self.dit_inputs(TextBatch.stack(embeds[: len(prompts)]), [grid])
            uncond = self.dit_inputs(TextBatch.stack(embeds[len(prompts) :]), [grid]) if use_cfg else None
        with timer.stage("prepare"):
            latents = torch.cat(
                [self.prepare_latents(p.seed, n, p.height, p.width) for p, n in zip(batch, counts)]  # type: ignore[arg-type]
            )
        with timer.stage("denoise"):
            latents = self.denoise(latents, cond, uncond, first, timer, on_step)
        with timer.stage("decode"):
            images = self.decode(latents, first.height, first.width, first.output_type)  # type: ignore[arg-type]
        return split_outputs(images, counts, {**timer.summary(), "batch_size": len(batch)})

    # ---- for benchmarks and parity checks ------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inputs(
        self, height: int, width: int, prompt: str | None = None, text_tokens: int | None = None
    ) -> dict:
        """Keyword arguments of one DiT forward at batch 1 and this size (mid-schedule t). Without a prompt the
        text is `BENCH_TEXT_TOKENS` tokens of the bench prompt repeated (a long prompt, the speed target's)."""
        if prompt is None:
            prompt = ", ".join([BENCH_PROMPT] * BENCH_TEXT_TOKENS)
            text_tokens = text_tokens or BENCH_TEXT_TOKENS
        embeds = self.encode_prompt([prompt], text_tokens or TOKENIZER_MAX_LENGTH)
        grid = tuple(s // 2 for s in self.latent_grid(height, width))
        return dict(
            hidden_states=self.prepare_latents(0, 1, height, width),
            timestep=torch.full((1,), 0.3, device=self.device, dtype=self.dtype),
            **self.dit_inputs(TextBatch.stack(embeds), [grid]),
        )

    def diffusers_forward_inputs(self, inputs: dict) -> dict:
        """The same forward in diffusers' form: `img_shapes` and `encoder_hidden_states_mask` for our ids and mask."""
        return diffusers_forward_inputs(inputs)

    def diffusers_pipeline(self):
        """diffusers' QwenImagePipeline on our components, its transformer holding our DiT's tensors (no copy)."""
        from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

        pipe = DiffusersQwenImagePipeline(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            transformer=diffusers_transformer_sharing(self.c.transformer),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def split_outputs(images: list, counts: list[int], timings: dict) -> list[PipelineOutput]:
    """One output per request: its `count` images in order, each with the batch's timings."""
    outputs, start = [], 0
    for n in counts:
        outputs.append(PipelineOutput(images=images[start : start + n], timings=dict(timings)))
        start += n
    return outputs


def diffusers_forward_inputs(inputs: dict) -> dict:
    """Our DiT's keyword arguments as diffusers' QwenImageTransformer2DModel takes them (its img_shapes rebuilt
    from the image ids: each frame's grid)."""
    ids = inputs["img_ids"]
    shapes = []
    for frame in range(int(ids[:, 0].max()) + 1):
        rows = ids[ids[:, 0] == frame]
        shapes.append((1, int(rows[:, 1].max() - rows[:, 1].min()) + 1, int(rows[:, 2].max() - rows[:, 2].min()) + 1))
    batch = inputs["hidden_states"].shape[0]
    return dict(
        hidden_states=inputs["hidden_states"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        encoder_hidden_states_mask=inputs.get("text_mask"),
        timestep=inputs["timestep"],
        img_shapes=[shapes] * batch,
    )


# ---- Qwen-Image-Edit, Edit-2509 and Edit-2511: the input images through the VL encoder and the VAE -----------------
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE_TOKENS = 64
IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE_MARKER = "Picture {}: " + IMAGE_MARKER  # Edit-2509/2511: each input image named in the prompt
EDIT_PLUS_CLASS = "QwenImageEditPlusPipeline"
CONDITION_AREA = 384 * 384  # Edit-2509/2511: the VL encoder sees each image at about this many pixels
VAE_AREA = 1024 * 1024  # and the VAE at about this many (Edit: both)
MAX_REFERENCE_IMAGES = 3  # Edit-2509/2511 are trained on one to three


def area_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at this width/height ratio, each a multiple of 32 (diffusers'
    calculate_dimensions)."""
    width = (area * ratio) ** 0.5
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def vl_inputs(tokenizer, image_processor, texts: list[str], images: list) -> dict:
    """What Qwen2-VL's processor makes of texts and images (transformers' Qwen2VLProcessor, which needs torchvision
    for its video half): the images' patches and grids from the image processor, each <|image_pad|> of the texts,
    in order, repeated once per merged patch of its image, then the texts tokenized with padding."""
    vision = image_processor(images=images, return_tensors="pt") if images else {}
    grids = vision.get("image_grid_thw")
    merge = image_processor.merge_size**2
    expanded, index = [], 0
    for text in texts:
        parts = text.split("<|image_pad|>")
        out = parts[0]
        for part in parts[1:]:
            out += "<|image_pad|>" * int(grids[index].prod() // merge) + part
            index += 1
        expanded.append(out)
    tokens = tokenizer(expanded, padding=True, return_tensors="pt")
    return {**tokens, **vision}


class QwenImageEditPipeline(QwenImagePipeline):
    """diffusers' QwenImageEditPipeline (one input image) and QwenImageEditPlusPipeline (Edit-2509 and -2511: one to
    three), step for step: each image resized for the VL encoder (Edit: to the output's default size; Plus: to about
    384² pixels, each named "Picture i:" in the prompt) and for the VAE (about 1024² pixels), its latents packed
    and appended to the noisy tokens of every forward as frames 1, 2, ... of the RoPE; the output size, unless
    given, about 1024² pixels at the aspect ratio of the first image (Edit) or the last (Plus, as diffusers)."""

    def __init__(self, spec, components, device, dtype, sampling_defaults: dict | None = None):
        super().__init__(spec, components, device, dtype, sampling_defaults)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.vl_image_processor = Qwen2VLImageProcessorPil()
        self.plus = True

    @classmethod
    def load(cls, source, device, dtype, load_format, seed: int = 0, host_components: frozenset[str] = frozenset()):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pipeline = super().load(source, device, dtype, load_format, seed, host_components)
        pipeline.plus = source.model_index().get("_class_name") == EDIT_PLUS_CLASS
        if source.folder is not None and (source.folder / "processor" / "preprocessor_config.json").is_file():
            pipeline.vl_image_processor = Qwen2VLImageProcessorPil.from_pretrained(source.folder / "processor")
        return pipeline

    image_mode = "RGB"

    def input_images(self, params: SamplingParams) -> list:
        return [load_image(image, self.image_mode) for image in params.images or []]

    def output_size(self, images: list) -> tuple[int, int]:
        """(height, width) when the request names none: about 1024² pixels at the first (Edit) or last (Plus)
        image's aspect ratio, floored to the spatial multiple."""
        reference = images[-1] if self.plus else images[0]
        width, height = area_dimensions(VAE_AREA, reference.width / reference.height)
        m = self.spatial_multiple
        return height // m * m, width // m * m

    def resolve(self, params: SamplingParams) -> SamplingParams:
        images = params.images or []
        if not images:
            raise ConfigError("images", "an edit model needs at least one input image")
        limit = MAX_REFERENCE_IMAGES if self.plus else 1
        if len(images) > limit:
            raise ConfigError("images", f"this model takes at most {limit} input image(s), got {len(images)}")
        loaded = self.input_images(params)
        # As PNG data URIs from here on: the request stays plain data (it crosses process boundaries as JSON).
        params = params.replace(images=[image_data_uri(image) for image in loaded])
        if params.height is None or params.width is None:
            height, width = self.output_size(loaded)
            params = params.replace(height=params.height or height, width=params.width or width)
        return super().resolve(params)

    def batch_key(self, params: SamplingParams) -> tuple:
        return (*super().batch_key(params), tuple(params.images or ()))  # only requests with the same images

    @torch.no_grad()
    def encode_edit_prompt(self, prompts: list[str], images: list, max_sequence_length: int) -> list[torch.Tensor]:
        """One [tokens, hidden] embedding per prompt, the images seen by the VL encoder beside each."""
        if self.plus:
            marker = "".join(PICTURE_MARKER.format(i + 1) for i in range(len(images)))
            texts = {p: EDIT_PROMPT_TEMPLATE.format(marker + p) for p in prompts}
        else:
            texts = {p: EDIT_PROMPT_TEMPLATE.format(IMAGE_MARKER + p) for p in prompts}
        by_text = {}
        for prompt, text in texts.items():
            inputs = vl_inputs(self.c.tokenizer, self.vl_image_processor, [text], images)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            hidden = self.c.text_encoder(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                output_hidden_states=True,
            ).hidden_states[-1]
            kept = hidden[0][inputs["attention_mask"][0].bool()][EDIT_TEMPLATE_TOKENS:]
            by_text[prompt] = kept[:max_sequence_length].to(self.dtype)
        return [by_text[p] for p in prompts]

    @torch.no_grad()
    def reference_latents(self, images: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The input images' packed VAE latents [1, Σ tokens, 4C] (the distributions' modes, normalised) and each
        one's token grid."""
        vae = self.c.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        packed, grids = [], []
        for image in images:
            width, height = area_dimensions(VAE_AREA, image.width / image.height)
            pixels = self.image_processor.preprocess(image, height, width).unsqueeze(2).to(self.device, self.dtype)
            latents = vae.encode(pixels).latent_dist.mode()
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
            latents = ((latents - mean) / std)[:, :, 0]
            packed.append(pack_latents(latents))
            grids.append((latents.shape[-2] // 2, latents.shape[-1] // 2))
        return torch.cat(packed, dim=1), grids

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Each request on its own (diffusers' edit pipelines take one prompt at a time): its prompts with the
        images through the VL encoder, the images through the VAE, one denoise loop with their latents beside the
        noise, one decode."""
        return [self.run_one(params, on_step) for params in batch]

    def run_one(self, params: SamplingParams, on_step: StepCallback | None = None) -> PipelineOutput:
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives([params])
        use_cfg = self.uses_cfg(params)
        images = self.input_images(params)
        grid = tuple(s // 2 for s in self.latent_grid(params.height, params.width))  # type: ignore[arg-type]
        with timer.stage("encode"):
            if self.plus:
                seen = []
                for image in images:
                    width, height = area_dimensions(CONDITION_AREA, image.width / image.height)
                    seen.append(self.image_processor.resize(image, height, width))
            else:
                width, height = area_dimensions(VAE_AREA, images[0].width / images[0].height)
                seen = [self.image_processor.resize(images[0], height, width)]
            texts = prompts + (negatives if use_cfg else [])
            embeds = self.encode_edit_prompt(texts, seen, params.max_sequence_length)  # type: ignore[arg-type]
            reference, grids = self.reference_latents(images if self.plus else seen)
            cond = self.dit_inputs(TextBatch.stack(embeds[: len(prompts)]), [grid, *grids])
            uncond = self.dit_inputs(TextBatch.stack(embeds[len(prompts) :]), [grid, *grids]) if use_cfg else None
        with timer.stage("prepare"):
            latents = self.prepare_latents(params.seed, counts[0], params.height, params.width)  # type: ignore[arg-type]
            reference = reference.expand(latents.shape[0], -1, -1)
        with timer.stage("denoise"):
            latents = self.denoise(latents, cond, uncond, params, timer, on_step, reference=reference)
        with timer.stage("decode"):
            out = self.decode(latents, params.height, params.width, params.output_type)  # type: ignore[arg-type]
        return PipelineOutput(images=out, timings={**timer.summary(), "batch_size": 1})

    def diffusers_pipeline(self):
        """diffusers' edit pipeline of this folder's kind on our components (see `vl_processor`)."""
        import diffusers

        name = EDIT_PLUS_CLASS if self.plus else "QwenImageEditPipeline"
        pipe = getattr(diffusers, name)(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            processor=VLProcessor(self.c.tokenizer, self.vl_image_processor),
            transformer=diffusers_transformer_sharing(self.c.transformer),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


class VLProcessor:
    """Qwen2-VL's processor call (`vl_inputs`) as diffusers' edit pipelines call it, for running them on our
    components where transformers' Qwen2VLProcessor cannot be built (it needs torchvision)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, text: list[str], images=None, padding: bool = True, return_tensors: str = "pt"):
        from transformers import BatchFeature

        images = images if isinstance(images, list) else [images] if images is not None else []
        texts = [text] if isinstance(text, str) else text  # Layered's captioning passes one string
        return BatchFeature(vl_inputs(self.tokenizer, self.image_processor, texts, images))

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


# ---- Qwen-Image-Layered: one RGBA image decomposed into layers --------------------------------------------------
LAYERED_RESOLUTIONS = (640, 1024)
CAPTION_MAX_NEW_TOKENS = 512

# Qwen-Image-Layered's captioning prompts (the model's own text, as diffusers' pipeline sends it): the image is
# captioned with the VL encoder when a request has no prompt; `options.use_en_prompt` picks English over Chinese.
CAPTION_PROMPTS = {
    "cn": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# 图像标注器\n"
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n"
        "1.\n"
        "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n"
        " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n"
        " -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n"
        " - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n"
        "3.\n"
        "保持真实性与准确性：\n"
        " - 不要使用笼统的描述\n"
        " -\n"
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "en": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# Image Annotator\n"
        "You are a professional\n"
        "image annotator. Please write an image caption based on the input image:\n"
        "1. Write the caption using natural,\n"
        "descriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n"
        " - Object\n"
        "attributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n"
        " - Vision Relations\n"
        "between objects, such as spatial relations, functional relations, possessive relations, attachment"
        " relations, action\n"
        "relations, comparative relations, causal relations, and so on\n"
        " - Environmental details, such as weather, lighting,\n"
        "colors, textures, atmosphere, and so on\n"
        " - Identify the text clearly visible in the image, without translation or\n"
        "explanation, and highlight it in the caption with quotation marks\n"
        "3. Maintain authenticity and accuracy:\n"
        " - Avoid\n"
        "generalizations\n"
        " - Describe all visible information in the image, while do not add information not explicitly shown in\n"
        "the image\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


class QwenImageLayeredPipeline(QwenImageEditPipeline):
    """diffusers' QwenImageLayeredPipeline step for step: the RGBA input resized to about `resolution`² pixels
    (options.resolution, 640 or 1024) through the VAE as the condition on RoPE frame −1, `layers` + 1 noisy frames
    (the first the whole image, dropped at the end) on frames 0 … layers, the text prompt in Qwen-Image's template
    (no image in it), sigmas linspace(1, 0, n + 1) without the last and μ = √(condition tokens / 256), true CFG
    (rescaled only with options.cfg_normalize), and `layers` RGBA images per sample. A request without a prompt
    gets the image's caption, written by the VL encoder (`caption`), as its prompt, as diffusers does; the result's
    params show it."""

    image_mode = "RGBA"

    def resolve(self, params: SamplingParams) -> SamplingParams:
        if len(params.images or []) != 1:
            raise ConfigError("images", "Qwen-Image-Layered takes exactly one input image (the one to decompose)")
        prompts = [params.prompt] if isinstance(params.prompt, str) or params.prompt is None else params.prompt
        captioned = all(p is None or (isinstance(p, str) and not p.strip()) for p in prompts)
        if not captioned and not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("prompt", "give one prompt for the image, or none to have it captioned")
        if captioned and len(prompts) > 1:
            raise ConfigError("prompt", "one image has one caption: give a single empty prompt, or the prompts")
        for name in ("height", "width"):
            if getattr(params, name) is not None:
                raise ConfigError(name, "Layered's size follows the input image at options.resolution (640 or 1024)")
        options = {**self.spec.sampling_options, **(params.options or {})}
        layers, resolution = options.get("layers"), options.get("resolution")
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= 16:
            raise ConfigError("options.layers", f"must be an integer from 1 to 16, got {layers!r}")
        if resolution not in LAYERED_RESOLUTIONS:
            raise ConfigError("options.resolution", f"must be 640 or 1024, got {resolution!r}")
        if not isinstance(options.get("cfg_normalize"), bool):
            raise ConfigError("options.cfg_normalize", "must be true or false")
        if not isinstance(options.get("use_en_prompt"), bool):
            raise ConfigError("options.use_en_prompt", "must be true or false")
        image = self.input_images(params)[0]
        width, height = area_dimensions(resolution * resolution, image.width / image.height)
        if captioned:
            resized = self.image_processor.resize(image, height, width)
            params = params.replace(prompt=self.caption(resized, "en" if options["use_en_prompt"] else "cn"))
        m = self.spatial_multiple
        params = params.replace(images=[image_data_uri(image)], height=height // m * m, width=width // m * m)
        return QwenImagePipeline.resolve(self, params)

    @torch.no_grad()
    def caption(self, image, language: str = "cn") -> str:
        """The image described by the VL encoder (greedy, or as the folder's generation config says), prompted with
        the model's captioning prompt in `language` (cn or en)."""
        inputs = vl_inputs(self.c.tokenizer, self.vl_image_processor, [CAPTION_PROMPTS[language]], [image])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        generated = self.c.text_encoder.generate(**inputs, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
        new_tokens = generated[0, inputs["input_ids"].shape[1] :]
        text = self.c.tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.strip()

    def run_one(self, params: SamplingParams, on_step: StepCallback | None = None) -> PipelineOutput:
        options = {**self.spec.sampling_options, **(params.options or {})}
        layers = options["layers"]
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives([params])
        use_cfg = self.uses_cfg(params)
        image = self.input_images(params)[0]
        h, w = self.latent_grid(params.height, params.width)  # type: ignore[arg-type]
        with timer.stage("encode"):
            embeds = self.encode_prompt(prompts + (negatives if use_cfg else []), params.max_sequence_length)  # type: ignore[arg-type]
            width, height = area_dimensions(options["resolution"] ** 2, image.width / image.height)
            resized = self.image_processor.resize(image, height, width)
            reference, grids = self.reference_latents_of(resized, height, width)
            layout = [(h // 2, w // 2)] * (layers + 1) + grids
            cond = self.dit_inputs(TextBatch.stack(embeds[: len(prompts)]), layout)
            uncond = self.dit_inputs(TextBatch.stack(embeds[len(prompts) :]), layout) if use_cfg else None
        with timer.stage("prepare"):
            n = counts[0]
            noise = seeded_noise((n, layers + 1, self.latent_channels, h, w), params.seed, self.dtype, self.device)  # type: ignore[arg-type]
            latents = torch.cat([pack_latents(noise[:, f]) for f in range(layers + 1)], dim=1)
            reference = reference.expand(n, -1, -1)
            scheduler = type(self.c.scheduler).from_config(self.c.scheduler.config)
            steps = params.num_inference_steps
            sigmas = np.linspace(1.0, 0, steps + 1)[:-1]  # type: ignore[operator]
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=(reference.shape[1] / 256) ** 0.5)
            scheduler.set_begin_index(0)
        with timer.stage("denoise"):
            latents = self.denoise(
                latents, cond, uncond, params, timer, on_step, reference, scheduler, options["cfg_normalize"]
            )
        with timer.stage("decode"):
            images = self.decode_layers(latents, layers, h, w, params.output_type)
        return PipelineOutput(images=images, timings={**timer.summary(), "batch_size": 1})

    @torch.no_grad()
    def reference_latents_of(self, image, height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The resized RGBA input's packed, normalised VAE latents [1, tokens, 4C] and its token grid."""
        vae = self.c.vae
        pixels = self.image_processor.preprocess(image, height, width).unsqueeze(2).to(self.device, self.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = ((latents - mean) / std)[:, :, 0]
        return pack_latents(latents), [(latents.shape[-2] // 2, latents.shape[-1] // 2)]

    @torch.no_grad()
    def decode_layers(self, latents: torch.Tensor, layers: int, h: int, w: int, output_type: str) -> list:
        """Every sample's layers (frames 1 … layers; frame 0, the whole image, dropped) as RGBA images, in order."""
        if output_type == "latent":
            return list(latents)
        if self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []
        vae = self.c.vae
        frames = latents.chunk(layers + 1, dim=1)
        x = torch.stack([unpack_latents(f, h, w) for f in frames[1:]], dim=2).to(vae.dtype)  # [B, C, L, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        x = x / inverse_std + mean
        b, c, f = x.shape[:3]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, 1, h, w)
        image = vae.decode(x, return_dict=False)[0].squeeze(2)
        return list(self.image_processor.postprocess(image, output_type=output_type))

    def diffusers_pipeline(self):
        """diffusers' QwenImageLayeredPipeline on our components (its captioning processor: see `VLProcessor`)."""
        from diffusers import QwenImageLayeredPipeline as DiffusersLayered

        pipe = DiffusersLayered(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            processor=VLProcessor(self.c.tokenizer, self.vl_image_processor),
            transformer=diffusers_transformer_sharing(self.c.transformer),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
