"""Train the built-in digits-video model: a tiny Wan2.1 text-to-video (our DiT, a small Wan VAE, a frozen random
UMT5) on clips of moving handwritten digits.

    python -m ditserve.digits.train_video --out DIR [--seed 0] [--device cpu]

Writes a WanPipeline folder in diffusers layout (WanPipeline.save_pretrained), loadable by ditserve and by diffusers
alike, plus `ditserve.json` with the sampling defaults the model was trained for. Steps:
1. a tiny Wan folder from `ditserve.tiny.wan` gives the frozen UMT5 (random weights are enough: the prompts differ
   in the digit's and the direction's tokens, and the DiT learns to read them), the code-built tokenizer and an
   untrained AutoencoderKLWan of three levels (4× spatial and 4× temporal compression);
2. the VAE is trained on random clips (`clips`: reconstruction + a small KL term); `latents_mean` and
   `latents_std` are set per channel from the latents' statistics (posterior samples), as Wan's VAE config carries
   them;
3. clips are encoded once (`clips_per_scan` of every scan, each with a random direction and offset); our
   WanTransformer is trained with the flow-matching objective Wan's UniPC (flow sigmas) samples: x_t = (1 - t)·x0
   + t·noise, target noise - x0, timestep 1000·t, both prompt forms, and the empty prompt in place of the clip's for
   a `cfg_dropout` fraction of samples (so CFG against negative_prompt "" works); an exponential moving average of
   its weights is what is saved, under diffusers' names (`to_diffusers_state_dict`).

Everything is seeded; on the CPU the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditserve.digits.clips import (
    CLIP_SIZE,
    DIRECTIONS,
    NUM_FRAMES,
    PROMPT_FORMS,
    prompt,
    random_motions,
    render_motions,
)
from ditserve.digits.data import load_digits
from ditserve.digits.train import log, randn_like, training_settings
from ditserve.loader.folder import SAMPLING_DEFAULTS_FILE


@dataclass
class VideoTrainConfig:
    seed: int = 0
    clip_size: int = CLIP_SIZE
    num_frames: int = NUM_FRAMES
    scans: int | None = None  # the first this many of scikit-learn's 1,797 scans (None: all; fewer: quick tests)
    # VAE: three levels of 8, 16, 16 channels → latents at 1/4 of the sides and (frames - 1)/4 + 1 frames: a
    # 48×48×9 clip is 8 channels × 3 × 12 × 12. Batches of 8 clips at 2e-3: 300 steps left blobs (the classifier read
    # 34% of its reconstructions right), 1,000 steps 81% (the gate needs 90% of the DiT's clips); 2,000 is a guess
    # along that line that the training log checks (`reconstruction_score`). Base 16 at 2e-3 collapsed to a blur.
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    latent_channels: int = 8
    vae_steps: int = 2000
    vae_batch_size: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    clips_per_scan: int = 4  # clips encoded for the DiT, each scan with random motions
    # DiT (text_dim: the UMT5's width). Patches of one latent value: 3 × 12 × 12 = 432 tokens, a token per 4×4
    # pixels (a digit ~6×6 tokens); 2×2 patches gave 108 (a digit ~3×3) and learned slower per step
    # (docs/digits-video.md).
    patch_size: tuple[int, int, int] = (1, 1, 1)
    num_layers: int = 4
    num_attention_heads: int = 3
    attention_head_dim: int = 32
    ffn_dim: int = 256
    text_dim: int = 32
    text_layers: int = 2
    # The text encoder can be trained beside the DiT at this rate (0: left frozen at its random weights, the
    # default). Frozen, it already keeps the digits apart: a digit's own token moves by more than a token's norm.
    # Neither training it nor (as a test) copying the digit's features onto every token made the DiT take up the
    # digit faster on the CPU (docs/digits-video.md, "Why the DiT ignored the digit").
    text_encoder_lr: float = 0.0
    # Timesteps: half logit-normal shifted by this (t → s·t / (1 + (s - 1)·t), as flow_shift shifts the sampler's
    # sigmas), half uniform. Shifted, the DiT learned the motion several times faster per step than unshifted.
    timestep_shift: float = 3.0
    dit_steps: int = 10000
    dit_lr: float = 1e-3
    dit_warmup: int = 200
    ema_decay: float = 0.999
    batch_size: int = 64
    # Classifier-free guidance: this fraction of samples is trained on the empty prompt, so the model also learns
    # the unconditional velocity that CFG (negative_prompt "") extrapolates away from.
    cfg_dropout: float = 0.1
    # Sampling the model is trained for (written to ditserve.json): the clip size, a UMT5 sequence both prompt
    # forms fit in, UniPC with flow sigmas and a shift that spends more steps at high noise.
    max_sequence_length: int = 40
    num_inference_steps: int = 12
    flow_shift: float = 3.0
    guidance_scale: float = 4.0
    negative_prompt: str = ""
    fps: int = 8


def base_pipeline(cfg: VideoTrainConfig, workdir: Path):
    """diffusers' WanPipeline of the right shapes: frozen random UMT5, untrained VAE and transformer."""
    from diffusers import WanPipeline

    from ditserve.tiny.wan import TinyWanSpec, make_tiny_wan

    spec = TinyWanSpec(
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        layers=cfg.num_layers,
        ffn_dim=cfg.ffn_dim,
        patch_size=cfg.patch_size,
        latent_channels=cfg.latent_channels,
        vae_base_dim=cfg.vae_base_dim,
        vae_dim_mult=cfg.vae_dim_mult,
        text_dim=cfg.text_dim,
        text_layers=cfg.text_layers,
        flow_shift=cfg.flow_shift,
        seed=cfg.seed,
    )
    make_tiny_wan(workdir, spec)
    pipe = WanPipeline.from_pretrained(workdir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_vae(vae: nn.Module, ink: np.ndarray, cfg: VideoTrainConfig, gen: torch.Generator, device: str) -> None:
    """Reconstruction + a small KL term on fresh random clips every step."""
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(ink), (cfg.vae_batch_size,), generator=gen).numpy()
        x = render_motions(ink[idx], *random_motions(len(idx), gen)).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * randn_like(posterior.mean, gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            log(f"vae {step:5d}  recon {rec.item():.4f}  kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_score(vae: nn.Module, ink: np.ndarray, labels: np.ndarray, device: str, n: int = 80) -> str:
    """`score_videos` of the VAE's reconstructions of n real clips (the last n scans, seeded motions): the most the
    DiT's clips can score through this VAE."""
    from ditserve.digits.video_quality import score_videos

    n = min(n, len(ink))
    direction, cross = random_motions(n, torch.Generator().manual_seed(1))
    clips = render_motions(ink[-n:], direction, cross)
    recon = torch.cat([vae.decode(vae.encode(c.to(device)).latent_dist.mean).sample.cpu() for c in clips.split(40)])
    return score_videos(recon.clamp(-1, 1), labels[-n:], [DIRECTIONS[d] for d in direction]).summary()


@torch.no_grad()
def encode_clips(
    vae: nn.Module, ink: np.ndarray, labels: np.ndarray, cfg: VideoTrainConfig, gen: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`clips_per_scan` random clips of every scan, encoded: (posterior means, stds [N, C, F', H', W'], digits [N],
    direction indices [N])."""
    n = len(ink) * cfg.clips_per_scan
    scans, digits = np.tile(ink, (cfg.clips_per_scan, 1, 1)), np.tile(labels, cfg.clips_per_scan)
    direction, cross = random_motions(n, gen)
    means, stds = [], []
    for start in range(0, n, 64):
        part = slice(start, start + 64)
        dist = vae.encode(render_motions(scans[part], direction[part], cross[part]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), torch.from_numpy(digits), torch.from_numpy(direction)


def prompt_tokens(pipe, cfg: VideoTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks [10 · directions · forms + 1, S] of every prompt as WanPipeline tokenizes them
    (`prompt_row` orders them), the negative prompt (the unconditional input of CFG) last."""
    prompts = [
        prompt(d, direction, form) for d in range(10) for direction in DIRECTIONS for form in range(len(PROMPT_FORMS))
    ]
    longest = max(len(pipe.tokenizer(p).input_ids) for p in prompts)
    if longest > cfg.max_sequence_length:
        raise ValueError(f"max_sequence_length {cfg.max_sequence_length} < {longest} tokens of the longest prompt")
    tokens = pipe.tokenizer(
        [*prompts, cfg.negative_prompt],
        padding="max_length",
        max_length=cfg.max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return tokens.input_ids, tokens.attention_mask


def prompt_row(digit: torch.Tensor, direction: torch.Tensor, form: torch.Tensor) -> torch.Tensor:
    """Rows of `prompt_tokens` of each (digit, direction index, form)."""
    return (digit * len(DIRECTIONS) + direction) * len(PROMPT_FORMS) + form


def encode_tokens(text_encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UMT5 sequences [N, S, D] as WanPipeline.encode_prompt makes them: zeros past each prompt's tokens."""
    return text_encoder(ids, mask).last_hidden_state * mask[..., None].to(torch.float32)


@torch.no_grad()
def log_prompt_distances(text_encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, label: str) -> None:
    """How far apart the encoder puts the prompts: the closest two, and how much of a digit's change reaches the
    tokens other than the digit's own (a frozen random encoder leaves nearly all of it on that one token)."""
    seqs = encode_tokens(text_encoder, ids, mask)[:-1]
    flat = seqs.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(len(flat), device=flat.device) * 1e9
    # "the digit 3 moving left" against "the digit 5 moving left": the digit is token 8 of form 0
    a, b = (int(prompt_row(torch.tensor(d), torch.tensor(0), torch.tensor(0))) for d in (3, 5))
    change = (seqs[a] - seqs[b]).norm(dim=-1)
    others = torch.cat([change[:8], change[9:]]).norm()
    log(
        f"text ({label}): closest two prompts {dist.min().item():.3f} apart (norm {flat.norm(dim=1).mean():.3f}); "
        f"digit 3 → 5 moves its own token {change[8].item():.2f}, all the others together {others.item():.2f}"
    )


def new_transformer(pipe, device: str):
    """Our WanTransformer, trainable, with diffusers' default init and adaLN-zero: the timestep's modulation, the
    blocks' tables and the output projection start at zero, so every block starts as the identity."""
    from ditserve.loader.weights import load_checkpoint
    from ditserve.models.wan import WanConfig, WanTransformer, map_diffusers_key

    model = WanTransformer(WanConfig.from_dict(dict(pipe.transformer.config))).to(device)
    fresh = type(pipe.transformer).from_config(pipe.transformer.config)  # default init, seeded by the caller
    load_checkpoint(model, iter(fresh.state_dict().items()), map_diffusers_key, where="initial weights")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or name.startswith(("time_proj", "proj_out")):
                p.zero_()
    return model.requires_grad_(True).train()


def load_trained_transformer(model: nn.Module, folder: Path, config: dict) -> None:
    """A digits-video folder's DiT weights into `model`, built from `config` (the recipe's transformer config),
    which the folder's must match."""
    from ditserve.loader.weights import checkpoint_files, iter_checkpoint, load_checkpoint
    from ditserve.models.wan import map_diffusers_key

    trained = json.loads((folder / "transformer" / "config.json").read_text())
    differ = sorted(k for k, v in config.items() if not k.startswith("_") and k in trained and trained[k] != v)
    if differ:
        raise ValueError(
            f"{folder}: its transformer differs from this recipe's in "
            + ", ".join(f"{k} ({trained[k]} there, {config[k]} here)" for k in differ)
        )
    files = checkpoint_files(folder / "transformer")
    load_checkpoint(model, iter_checkpoint(files), map_diffusers_key, where=f"{folder}/transformer")


def train_dit(
    model: nn.Module,
    text_encoder: nn.Module,
    latents_mean: torch.Tensor,
    latents_std: torch.Tensor,
    digits: torch.Tensor,
    directions: torch.Tensor,
    token_ids: torch.Tensor,
    token_mask: torch.Tensor,
    cfg: VideoTrainConfig,
    gen: torch.Generator,
) -> tuple[nn.Module, nn.Module]:
    """Flow matching on normalised latents [N, C, F', H', W'], the prompts encoded each step when the text encoder
    is trained beside the DiT (`cfg.text_encoder_lr` > 0), once when it is frozen; returns the moving averages of
    the DiT's and the text encoder's weights."""
    from ditserve.models.wan import video_position_ids
    from ditserve.pipelines.wan import patchify, unpatchify

    device = latents_mean.device
    patch = tuple(model.config.patch_size)
    grid = tuple(s // p for s, p in zip(latents_mean.shape[2:], patch))
    ids = video_position_ids(*grid, device=device)
    train_text = cfg.text_encoder_lr > 0
    # eval(): UMT5's dropout stays off, trained or not (the pipeline encodes without it)
    text_encoder.eval().requires_grad_(train_text)
    both = nn.ModuleList([model, text_encoder])
    ema = copy.deepcopy(both).requires_grad_(False).eval()
    groups = [{"params": list(model.parameters())}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.dit_lr, weight_decay=0.0)
    trained = [p for group in groups for p in group["params"]]

    # Linear warm-up, then cosine decay to zero: the last steps refine at a small rate.
    def lr_factor(step: int) -> float:
        if step < cfg.dit_warmup:
            return (step + 1) / cfg.dit_warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.dit_warmup) / max(1, cfg.dit_steps - cfg.dit_warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n = len(digits)
    token_ids, token_mask = token_ids.to(device), token_mask.to(device)
    empty_row = len(token_ids) - 1
    # A frozen encoder gives every prompt the same sequence each step: encoded once, indexed per batch.
    frozen_seqs = None
    if not train_text:
        with torch.no_grad():
            frozen_seqs = encode_tokens(text_encoder, token_ids, token_mask)
    for step in range(cfg.dit_steps):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen).to(device)
        form = torch.randint(len(PROMPT_FORMS), (cfg.batch_size,), generator=gen).to(device)
        # A fresh posterior sample each time: the VAE's noise is free augmentation.
        x0 = latents_mean[idx] + latents_std[idx] * randn_like(latents_mean[idx], gen)
        noise = randn_like(x0, gen)
        # Half logit-normal shifted towards high noise as the sampler's sigmas are (where the digit and its path
        # are decided), half uniform (so the last, low-noise steps that clean up the strokes are trained too).
        half = torch.rand(cfg.batch_size, generator=gen) < 0.5
        u = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))
        shifted = cfg.timestep_shift * u / (1 + (cfg.timestep_shift - 1) * u)
        t = torch.where(half, shifted, torch.rand(cfg.batch_size, generator=gen)).to(device)
        xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout).to(device)
        rows = torch.where(drop, empty_row, prompt_row(digits[idx], directions[idx], form))
        if frozen_seqs is not None:
            seq = frozen_seqs[rows]
        else:
            seq = encode_tokens(text_encoder, token_ids[rows], token_mask[rows])
        out = model(patchify(xt, patch), timestep=1000 * t, text_states=seq, video_ids=ids)
        loss = F.mse_loss(unpatchify(out, grid, patch), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), both.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == cfg.dit_steps - 1:
            log(f"dit {step:5d}  loss {loss.item():.4f}")
    text_encoder.requires_grad_(False)
    return ema[0], ema[1]


def save_folder(
    pipe,
    ema: nn.Module,
    text_encoder: nn.Module,
    cfg: VideoTrainConfig,
    out: Path,
    vae_from: Path | None = None,
    dit_from: Path | None = None,
) -> None:
    from ditserve.models.wan import to_diffusers_state_dict

    pipe.to("cpu")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in to_diffusers_state_dict(ema).items()}
    missing, unexpected = pipe.transformer.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    pipe.text_encoder.load_state_dict({k: v.detach().cpu() for k, v in text_encoder.state_dict().items()})
    pipe.save_pretrained(out, safe_serialization=True)
    # diffusers records the temporary folder the pipeline was loaded from; drop it so reruns write the same files.
    for config in [out / "model_index.json", *out.glob("*/config.json")]:
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    previous = None
    if dit_from is not None:
        previous = json.loads((Path(dit_from) / SAMPLING_DEFAULTS_FILE).read_text()).get("trained_with")
    defaults = {
        "sampling_defaults": {
            "height": cfg.clip_size,
            "width": cfg.clip_size,
            "num_frames": cfg.num_frames,
            "num_inference_steps": cfg.num_inference_steps,
            "max_sequence_length": cfg.max_sequence_length,
            "guidance_scale": cfg.guidance_scale,
            "negative_prompt": cfg.negative_prompt,
            "fps": cfg.fps,
        },
        "trained_with": asdict(cfg)
        | ({"vae_from": str(vae_from)} if vae_from is not None else {})
        | ({"dit_from": str(dit_from), "dit_from_trained_with": previous} if dit_from is not None else {}),
    }
    (out / SAMPLING_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def train(
    cfg: VideoTrainConfig,
    out: Path,
    device: str = "cpu",
    vae_from: Path | None = None,
    dit_from: Path | None = None,
) -> Path:
    """Train and write the folder; `vae_from`: a digits-video folder whose trained VAE is taken as it is (no VAE
    steps), so that DiT recipes can be compared on one VAE; `dit_from`: a digits-video folder whose model is trained
    further (its VAE and text encoder as they are, its latent statistics, its DiT as the starting weights), so that a
    run cut short by its time slot can be continued in the next."""
    if dit_from is not None:
        if vae_from is not None and Path(vae_from) != Path(dit_from):
            raise ValueError("dit_from takes the VAE of its own folder: leave vae_from unset")
        vae_from = dit_from
    with training_settings():
        return _train(cfg, out, device, vae_from, dit_from)


def _train(cfg: VideoTrainConfig, out: Path, device: str, vae_from: Path | None, dit_from: Path | None) -> Path:
    if (cfg.clip_size, cfg.num_frames) != (CLIP_SIZE, NUM_FRAMES):
        raise ValueError(f"the clips are {CLIP_SIZE}×{CLIP_SIZE}, {NUM_FRAMES} frames (ditserve.digits.clips)")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    ink, labels = load_digits()
    ink, labels = ink[: cfg.scans], labels[: cfg.scans]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = base_pipeline(cfg, Path(tmp))
    if vae_from is not None:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32)
        if vae.config.z_dim != cfg.latent_channels:
            raise ValueError(f"{vae_from}: a VAE of {vae.config.z_dim} latent channels, not {cfg.latent_channels}")
        pipe.register_modules(vae=vae.eval().requires_grad_(False))
    if dit_from is not None:
        text_encoder = type(pipe.text_encoder).from_pretrained(Path(dit_from) / "text_encoder", dtype=torch.float32)
        pipe.register_modules(text_encoder=text_encoder.eval())
    pipe.to(device)
    log(f"data: {len(labels)} scans, clips of {NUM_FRAMES} frames of {CLIP_SIZE}×{CLIP_SIZE}")

    if vae_from is None:
        vae_start = time.time()
        train_vae(pipe.vae, ink, cfg, gen, device)
        log(f"vae: {cfg.vae_steps} steps in {time.time() - vae_start:.1f} s")
    else:
        log(f"vae: taken from {vae_from}")
    log(f"vae: its reconstructions of real clips score {reconstruction_score(pipe.vae, ink, labels, device)}")
    mean, std, digits, directions = encode_clips(pipe.vae, ink, labels, cfg, gen, device)
    if dit_from is None:
        # Statistics of the posterior samples the DiT learns from: the means' spread plus the posterior's own, so a
        # channel the VAE leaves to noise is not blown up by a tiny spread of its means. A DiT trained further
        # keeps the statistics it was trained on (its folder's VAE config).
        channel_mean = mean.mean(dim=(0, 2, 3, 4))
        channel_std = (mean.var(dim=(0, 2, 3, 4)) + std.square().mean(dim=(0, 2, 3, 4))).sqrt()
        pipe.vae.register_to_config(
            latents_mean=[round(v, 4) for v in channel_mean.tolist()],
            latents_std=[round(v, 4) for v in channel_std.tolist()],
        )
    shape = (1, -1, 1, 1, 1)
    shift = torch.tensor(pipe.vae.config.latents_mean, device=device).view(shape)
    scale = torch.tensor(pipe.vae.config.latents_std, device=device).view(shape)
    log(f"vae: {len(digits)} clips encoded to {list(mean.shape[1:])} ({time.time() - start:.0f} s so far)")

    token_ids, token_mask = prompt_tokens(pipe, cfg)
    log_prompt_distances(pipe.text_encoder, token_ids.to(device), token_mask.to(device), "random")
    model = new_transformer(pipe, device)
    if dit_from is not None:
        load_trained_transformer(model, Path(dit_from), dict(pipe.transformer.config))
        log(f"dit: starting from {dit_from}'s weights")
    latents = (mean - shift) / scale, std / scale
    dit_start = time.time()
    ema, text_encoder = train_dit(
        model, pipe.text_encoder, *latents, digits.to(device), directions.to(device), token_ids, token_mask, cfg, gen
    )
    log(f"dit: {cfg.dit_steps} steps in {time.time() - dit_start:.1f} s")
    if cfg.text_encoder_lr > 0:
        log_prompt_distances(text_encoder, token_ids.to(device), token_mask.to(device), "trained")
    save_folder(pipe, ema, text_encoder, cfg, out, vae_from, dit_from)
    log(f"wrote {out} in {time.time() - start:.0f} s")
    return out


def evaluate(folder: Path, seeds: int = 2, device: str = "cpu") -> None:
    """Every digit × direction with `seeds` seeds, scored."""
    from ditserve import Engine
    from ditserve.digits.video_quality import generate_grid, score_videos

    engine = Engine.from_pretrained(str(folder), device=device, dtype="float32")
    videos, digits, directions = generate_grid(engine, range(seeds))
    log(
        f"scores (float32, {seeds} seeds per digit and direction): {score_videos(videos, digits, directions).summary()}"
    )


def config_overrides(items: list[str]) -> dict:
    """["vae_steps=300", "vae_dim_mult=1,2,2", ...] → VideoTrainConfig keyword arguments of the fields' types."""
    defaults = asdict(VideoTrainConfig())
    out: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(defaults)}")
        default = defaults[name]
        try:
            if isinstance(default, tuple | list):
                out[name] = tuple(int(v) for v in text.split(","))
            elif default is None:  # scans
                out[name] = None if text.lower() in ("", "none") else int(text)
            else:
                out[name] = type(default)(text)
        except ValueError:
            raise ValueError(f"{item!r}: {text!r} is not a {type(default).__name__}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditserve.digits.train_video", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the model to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=VideoTrainConfig.vae_steps)
    p.add_argument("--dit-steps", type=int, default=VideoTrainConfig.dit_steps)
    p.add_argument("--batch-size", type=int, default=VideoTrainConfig.batch_size)
    p.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    p.add_argument(
        "--vae-from", type=Path, default=None, help="a digits-video folder whose VAE to take as it is (no VAE steps)"
    )
    p.add_argument(
        "--dit-from",
        type=Path,
        default=None,
        help="a digits-video folder to train further: its VAE, text encoder and latent statistics as they are, its "
        "DiT as the starting weights (--dit-steps more steps, a fresh warm-up and cosine decay)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip scoring the written model")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: the same weights whatever the machine's count)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other VideoTrainConfig field, e.g. --set vae_base_dim=8 (tuples as 1,2,2); repeatable",
    )
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    settings = dict(seed=ns.seed, vae_steps=ns.vae_steps, dit_steps=ns.dit_steps, batch_size=ns.batch_size)
    try:
        settings.update(config_overrides(ns.set))
    except ValueError as e:
        p.error(f"--set: {e}")
    cfg = VideoTrainConfig(**settings)
    if ns.dit_from is not None and ns.vae_from is not None:
        p.error("--dit-from takes its folder's VAE: leave out --vae-from")
    out = train(cfg, Path(ns.out), ns.device, ns.vae_from, ns.dit_from)
    if not ns.no_eval:
        evaluate(out, device=ns.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
