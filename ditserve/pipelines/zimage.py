"""Z-Image text-to-image: Qwen3 hidden states → patch tokens → flow-matching Euler → VAE decode.

Every stage reproduces diffusers' ZImagePipeline (0.42.1) step for step, so that the same folder and seed give the
same image: the same chat template and tokenizer settings, hidden_states[-2] with the padding dropped per prompt,
the same noise draw (float32, whatever the model's dtype), the same sigmas (torch.linspace(1, 1/n, n) through the
scheduler's shift), the same timestep convention ((1000 - t) / 1000, 1 = clean) and negated model output, CFG as
diffusers does it (pos + g·(pos − neg) whenever guidance_scale > 0, with its cfg_normalization and cfg_truncation),
the same decode. Only the DiT is ours.

What diffusers does inside its transformer (patchify, padding to multiples of 32, position ids) happens here, so the
DiT takes rectangular tensors. diffusers runs a batch whose padded caption lengths differ with an attention mask;
here such samples go through the DiT in separate groups of equal padded length (no mask, the same result up to
float rounding), and the CFG branches are separate forwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from ditserve.config import ConfigError, SamplingParams
from ditserve.models.zimage import SEQ_MULTIPLE, ZImageConfig, ZImageTransformer, to_diffusers_state_dict
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
from ditserve.pipelines.flux import calculate_shift  # the same mu as FLUX.1 (diffusers copies it too)
from ditserve.utils.timing import StageTimer


@dataclass
class ZImageComponents:
    """What families/zimage.py lists, loaded by `loader.folder.load_components` (the tokenizer is the
    Qwen2Tokenizer model_index.json names, which is also what AutoTokenizer resolves for Qwen3's files)."""

    transformer: ZImageTransformer
    vae: nn.Module
    text_encoder: nn.Module  # transformers' Qwen3Model
    tokenizer: object
    scheduler: object


# ---- the token layout diffusers' ZImageTransformer2DModel builds inside its forward ------------------------------
def padded_length(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C]: each token holds its patch's pixels, channels fastest."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of patchify for an h × w latent; tokens past (h/p)(w/p) (padding) are dropped."""
    b, _, width = tokens.shape
    c = width // (p * p)
    x = tokens[:, : (h // p) * (w // p)].reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S, D] → [B, length, D], repeating the last token (diffusers' padding; the model replaces these)."""
    missing = length - x.shape[1]
    return x if missing == 0 else torch.cat([x, x[:, -1:].expand(-1, missing, -1)], dim=1)


def caption_position_ids(padded_len: int, device: torch.device) -> torch.Tensor:
    """[L, 3] ids (1 + i, 0, 0), pads included."""
    ids = torch.zeros(padded_len, 3, dtype=torch.int32, device=device)
    ids[:, 0] = torch.arange(1, padded_len + 1, device=device)
    return ids


def image_position_ids(h_tokens: int, w_tokens: int, caption_padded_len: int, device: torch.device) -> torch.Tensor:
    """[N, 3] ids (caption length + 1, row, col) of the patch tokens, then (0, 0, 0) for the pads up to N."""
    n = h_tokens * w_tokens
    ids = torch.zeros(padded_length(n), 3, dtype=torch.int32, device=device)
    ids[:n, 0] = caption_padded_len + 1
    ids[:n, 1] = torch.arange(h_tokens, device=device).repeat_interleave(w_tokens)
    ids[:n, 2] = torch.arange(w_tokens, device=device).repeat(h_tokens)
    return ids


def image_pad_mask(n: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(padded_length(n), dtype=torch.bool, device=device)
    mask[:n] = False
    return mask


@dataclass
class CaptionGroup:
    """Samples whose captions pad to the same length, and their DiT inputs apart from the image tokens."""

    index: torch.Tensor | None  # which samples of the batch, in order; None: all of them
    inputs: dict[str, torch.Tensor]  # caption_feats, caption_pad, caption_ids, image_ids


def caption_groups(embeds: list[torch.Tensor], h_tokens: int, w_tokens: int) -> list[CaptionGroup]:
    """The batch's DiT inputs, one group per padded caption length (in order of first appearance)."""
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(embeds):
        by_length.setdefault(padded_length(e.shape[0]), []).append(i)
    groups = []
    for length, members in by_length.items():
        device = embeds[members[0]].device
        feats = torch.stack([pad_tokens(embeds[i][None], length)[0] for i in members])
        pad = torch.stack([torch.arange(length, device=device) >= embeds[i].shape[0] for i in members])
        index = None if len(members) == len(embeds) else torch.tensor(members, device=device)
        groups.append(
            CaptionGroup(
                index,
                dict(
                    caption_feats=feats,
                    caption_pad=pad,
                    caption_ids=caption_position_ids(length, device),
                    image_ids=image_position_ids(h_tokens, w_tokens, length, device),
                ),
            )
        )
    return groups


class ZImagePipeline(Pipeline):
    components_class = ZImageComponents
    c: ZImageComponents

    def __init__(self, spec, components: ZImageComponents, device, dtype, sampling_defaults: dict | None = None):
        from diffusers.image_processor import VaeImageProcessor

        super().__init__(spec, components, device, dtype, sampling_defaults)
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.patch_size = components.transformer.config.patch_size
        self.latent_channels = components.transformer.config.in_channels

    # ---- defaults: diffusers' ZImagePipeline.__call__'s (the spec's), unless the folder names its own -----------

    @property
    def default_side(self) -> int:
        return 1024  # diffusers: `height or 1024`, whatever the VAE

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def max_sequence_length_limit(self) -> int:
        # Caption positions run to the padded length and image tokens sit one past it on the first RoPE axis,
        # whose table (axes_lens[0]) they must stay inside, as diffusers' lookup does.
        return (self.c.transformer.config.axes_lens[0] - 2) // SEQ_MULTIPLE * SEQ_MULTIPLE

    def resolve(self, params: SamplingParams) -> SamplingParams:
        if params.true_cfg_scale not in (None, 1, 1.0):
            raise ConfigError(
                "true_cfg_scale",
                "Z-Image has one guidance scale: use guidance_scale (CFG with the negative prompt when > 0, as "
                "diffusers' ZImagePipeline)",
            )
        for name, value in (params.options or {}).items():
            if name == "cfg_normalization" and not (value is None or isinstance(value, bool | int | float)):
                raise ConfigError("options.cfg_normalization", f"must be true/false, a number or null, got {value!r}")
            if name == "cfg_truncation" and (
                isinstance(value, bool) or not (value is None or isinstance(value, int | float))
            ):
                raise ConfigError("options.cfg_truncation", f"must be a number or null, got {value!r}")
        return super().resolve(params)

    # ---- stages -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        """One [tokens, hidden] embedding per prompt: Qwen3's second-to-last hidden states of the chat-formatted
        prompt, padding dropped. Prompts that repeat are encoded once (each row's result does not depend on the
        others: the encoder is causal and every row is right-padded).

        diffusers pads every prompt to max_sequence_length; since the encoder is causal, the hidden states of the
        real tokens do not depend on the pads after them, so the batch is padded only to its longest prompt
        (truncated at max_sequence_length as diffusers truncates): the same embeddings up to the rounding of the
        attention's sums, for a fraction of the encoder's work (512 positions for a 40-token prompt otherwise)."""
        unique = list(dict.fromkeys(prompts))
        texts = [
            self.c.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in unique
        ]
        inputs = self.c.tokenizer(
            texts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids = inputs.input_ids.to(self.device)
        mask = inputs.attention_mask.to(self.device).bool()
        hidden = self.c.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        by_text = {p: hidden[i][mask[i]] for i, p in enumerate(unique)}
        return [by_text[p] for p in prompts]

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

    def prepare_latents(self, seed: int, batch: int, height: int, width: int) -> torch.Tensor:
        """Noise as diffusers draws it: float32 whatever the model's dtype (the denoise loop stays in float32)."""
        h, w = self.latent_grid(height, width)
        return seeded_noise((batch, self.latent_channels, h, w), seed, torch.float32, self.device)

    def make_scheduler(self, num_steps: int, image_seq_len: int):
        """A fresh scheduler per request (it keeps a step index), set to diffusers' Z-Image sigma schedule."""
        scheduler = type(self.c.scheduler).from_config(self.c.scheduler.config)
        cfg = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def run_dit(
        self, tokens: torch.Tensor, image_pad: torch.Tensor, groups: list[CaptionGroup], timestep: torch.Tensor
    ) -> torch.Tensor:
        """The DiT on every sample, one forward per caption group; [B, N, p²·C] in the model's dtype."""
        if len(groups) == 1 and groups[0].index is None:
            return self.c.transformer(tokens, timestep=timestep, image_pad=image_pad, **groups[0].inputs)
        out = torch.empty_like(tokens)
        for g in groups:
            out[g.index] = self.c.transformer(
                tokens[g.index], timestep=timestep[g.index], image_pad=image_pad, **g.inputs
            )
        return out

    def predict_noise(
        self,
        latents: torch.Tensor,
        cond: list[CaptionGroup],
        uncond: list[CaptionGroup] | None,
        timestep: torch.Tensor,
        guidance_scale: float,
        cfg_normalization: float,
    ) -> torch.Tensor:
        """The model's output in float32 [B, C, H, W] (not yet negated), with CFG when `uncond` is given.

        With CFG parallelism the two branches run at once on the two halves of the ranks, and an all-gather gives
        every rank both predictions (so every rank takes the same scheduler step).
        """
        h, w = latents.shape[-2:]
        p = self.patch_size
        n = (h // p) * (w // p)
        tokens = pad_tokens(patchify(latents.to(self.dtype), p), padded_length(n))
        image_pad = image_pad_mask(n, tokens.device)

        def branch(groups):
            return unpatchify(self.run_dit(tokens, image_pad, groups, timestep), h, w, p).float()

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
        pred = positive + guidance_scale * (positive - negative)
        if cfg_normalization > 0:  # each sample's norm capped at cfg_normalization × its positive's
            pos_norm = torch.linalg.vector_norm(positive, dim=(1, 2, 3), keepdim=True)
            new_norm = torch.linalg.vector_norm(pred, dim=(1, 2, 3), keepdim=True)
            max_norm = pos_norm * cfg_normalization
            pred = torch.where(new_norm > max_norm, pred * (max_norm / new_norm), pred)
        return pred

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        cond: list[torch.Tensor],
        uncond: list[torch.Tensor] | None,
        params: SamplingParams,
        timer: StageTimer,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        h, w = latents.shape[-2:]
        p = self.patch_size
        scheduler = self.make_scheduler(params.num_inference_steps, (h // 2) * (w // 2))  # type: ignore[arg-type]
        cond_groups = caption_groups(cond, h // p, w // p)
        uncond_groups = caption_groups(uncond, h // p, w // p) if uncond is not None else None
        options = {**self.spec.sampling_options, **(params.options or {})}
        # None turns either off, as in diffusers; cfg_normalization=True caps the norm at the positive's.
        truncation = float("inf") if options["cfg_truncation"] is None else float(options["cfg_truncation"])
        normalization = float(options["cfg_normalization"] or 0.0)
        timesteps = scheduler.timesteps
        t_norms = ((1000 - timesteps.float()) / 1000).tolist()
        batch = latents.shape[0]
        for i, t in enumerate(timesteps):
            timer.step_begin()
            timestep = (1000 - t.expand(batch)) / 1000
            scale = params.guidance_scale
            if uncond is not None and truncation <= 1 and t_norms[i] > truncation:
                scale = 0.0  # diffusers' cfg_truncation: no CFG once the timestep passes it
            use_cfg = uncond_groups if uncond is not None and scale > 0 else None
            noise_pred = -self.predict_noise(latents, cond_groups, use_cfg, timestep, scale, normalization)  # type: ignore[arg-type]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.step_end()
            if on_step is not None:
                on_step(i, len(timesteps))
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str) -> list:
        if output_type == "latent":
            return list(latents)
        x = latents.to(self.c.vae.dtype) / self.c.vae.config.scaling_factor + self.c.vae.config.shift_factor
        if needs_tiling(self.c.vae, x):
            image = tiled_decode(self.c.vae, x, self.decode_group)
        elif self.decode_group is not None and dist.get_rank(self.decode_group) != 0:
            return []  # one tile: rank 0 decodes it alone
        else:
            image = self.c.vae.decode(x, return_dict=False)[0]
        return list(self.image_processor.postprocess(image, output_type=output_type))

    # ---- several requests as one batch ------------------------------------------------------------------------
    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key as one batch: one encode, one denoise loop, one decode.

        Each request keeps its own seed (its noise is its own draw, as alone). In each step the DiT runs once per
        group of samples whose captions pad to the same length (see `caption_groups`), so results match the
        requests run alone up to float rounding of the larger matmuls.
        """
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        first = batch[0]
        timer = StageTimer(self.device)
        prompts, negatives, counts = prompts_with_negatives(batch)
        with timer.stage("encode"):
            use_cfg = first.guidance_scale > 0  # type: ignore[operator]
            embeds = self.encode_prompt(prompts + (negatives if use_cfg else []), first.max_sequence_length)  # type: ignore[arg-type]
            cond, uncond = embeds[: len(prompts)], (embeds[len(prompts) :] if use_cfg else None)
        with timer.stage("prepare"):
            latents = torch.cat(
                [self.prepare_latents(p.seed, n, p.height, p.width) for p, n in zip(batch, counts)]  # type: ignore[arg-type]
            )
        with timer.stage("denoise"):
            latents = self.denoise(latents, cond, uncond, first, timer, on_step)
        with timer.stage("decode"):
            images = self.decode(latents, first.output_type)
        timings = {**timer.summary(), "batch_size": len(batch)}
        outputs, start = [], 0
        for n in counts:
            outputs.append(PipelineOutput(images=images[start : start + n], timings=dict(timings)))
            start += n
        return outputs

    # ---- for benchmarks and parity checks ------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inputs(self, height: int, width: int, prompt: str = BENCH_PROMPT) -> dict:
        """Keyword arguments of one DiT forward at batch 1 for a fixed prompt at this size (mid-schedule t).
        diffusers' transformer takes the same forward as `self.diffusers_forward_inputs(inputs)`."""
        h, w = self.latent_grid(height, width)
        p = self.patch_size
        embeds = self.encode_prompt([prompt], self.defaults().max_sequence_length)  # type: ignore[arg-type]
        group = caption_groups(embeds, h // p, w // p)[0]
        tokens = patchify(self.prepare_latents(0, 1, height, width).to(self.dtype), p)
        return dict(
            image_tokens=pad_tokens(tokens, padded_length(tokens.shape[1])),
            timestep=torch.full((1,), 0.3, device=self.device, dtype=torch.float32),
            image_pad=image_pad_mask(tokens.shape[1], self.device),
            **group.inputs,
        )

    def diffusers_pipeline(self):
        """diffusers' ZImagePipeline on our components, its transformer holding our DiT's tensors (no copy)."""
        from diffusers import ZImagePipeline as DiffusersZImagePipeline
        from diffusers import ZImageTransformer2DModel

        cfg = self.c.transformer.config
        # ZImageConfig's fields are diffusers' config names, so the config passes through as is.
        config = {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in fields(cfg)}
        transformer = diffusers_model_sharing(
            ZImageTransformer2DModel, config, to_diffusers_state_dict(self.c.transformer)
        )
        pipe = DiffusersZImagePipeline(
            scheduler=copy.deepcopy(self.c.scheduler),
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def diffusers_forward_inputs(self, inputs: dict) -> dict:
        """`forward_inputs` in the form diffusers' ZImageTransformer2DModel takes (see `diffusers_forward_inputs`)."""
        return diffusers_forward_inputs(inputs, self.c.transformer.config)

    def comparable_outputs(self, ours: torch.Tensor, theirs, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both as latents [B, C, H, W]: ours unpatchified (padding dropped), diffusers' list stacked."""
        latents = torch.stack(list(theirs[0])).squeeze(2)
        return unpatchify(ours, latents.shape[-2], latents.shape[-1], self.patch_size), latents


def diffusers_forward_inputs(inputs: dict, config: ZImageConfig) -> dict:
    """The same DiT forward in diffusers' form (lists of unpadded latents [C, 1, H, W] and caption features),
    from our keyword arguments; diffusers' output list stacks to what `unpatchify` gives from ours."""
    ids = inputs["image_ids"][~inputs["image_pad"]]
    h_tokens, w_tokens = (int(ids[:, axis].max()) + 1 for axis in (1, 2))
    p = config.patch_size
    latents = unpatchify(inputs["image_tokens"], h_tokens * p, w_tokens * p, p)
    caps = [feats[~pad] for feats, pad in zip(inputs["caption_feats"], inputs["caption_pad"])]
    return dict(x=list(latents.unsqueeze(2).unbind(0)), t=inputs["timestep"], cap_feats=caps)
