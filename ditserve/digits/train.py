"""Train the built-in digits model: a tiny FLUX.1 (our DiT, a small VAE, frozen random text encoders).

    python -m ditserve.digits.train --out DIR [--seed 0] [--device cpu]

Writes a FluxPipeline folder in diffusers layout (FluxPipeline.save_pretrained), loadable by ditserve and by
diffusers alike, plus `ditserve.json` with the sampling defaults the model was trained for. Steps:
1. a tiny random FLUX.1 folder from `ditserve.tiny` gives the frozen CLIP and T5 (random weights are enough: the
   prompts differ in the digit's token, and the DiT learns to read it) and an untrained VAE of the right shape;
2. the VAE is trained on the upsampled digits (reconstruction + a small KL term); `shift_factor` and
   `scaling_factor` are set from the latents' statistics, as FLUX's VAE config has them;
3. our FluxTransformer is trained with FLUX's flow-matching objective on the packed latents: x_t = (1 - t)·x0 +
   t·noise, target = noise - x0, t in [0, 1], both prompt forms, and the empty prompt in place of the digit's for
   a `cfg_dropout` fraction of samples (so true CFG against negative_prompt "" works); an exponential moving
   average of its weights is what is saved, under diffusers' names (`to_diffusers_state_dict`).

Everything is seeded; on the CPU the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.digits.data import IMAGE_SIZE, PROMPT_FORMS, load_digits, prompt, upsample
from ditserve.loader.folder import SAMPLING_DEFAULTS_FILE


@dataclass
class TrainConfig:
    seed: int = 0
    image_size: int = IMAGE_SIZE
    # VAE: two levels → latents at 1/2 the image side; packed 2×2 that is one DiT token per 4×4 pixels, i.e. per
    # pixel of the original 8×8 scans.
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    vae_steps: int = 200
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    # DiT
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text_dim: int = 32
    dit_steps: int = 3500
    dit_lr: float = 1e-3
    dit_warmup: int = 100
    ema_decay: float = 0.999
    batch_size: int = 32
    # Classifier-free guidance: this fraction of samples is trained on the empty prompt, so the model also learns
    # the unconditional velocity that true CFG (negative_prompt "") extrapolates away from.
    cfg_dropout: float = 0.1
    # Sampling the model is trained for (written to ditserve.json): a short T5 sequence (both prompt forms fit)
    # and a schedule that spends more steps at high noise, where the digit's shape is decided.
    max_sequence_length: int = 24
    num_inference_steps: int = 20
    scheduler_shift: float = 3.0
    # True CFG against the empty prompt (what cfg_dropout trains): at 4 nearly every image shows the digit asked for.
    true_cfg_scale: float = 4.0
    negative_prompt: str = ""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_pipeline(cfg: TrainConfig, workdir: Path):
    """diffusers' FluxPipeline of the right shapes: frozen random text encoders, untrained VAE and transformer."""
    from diffusers import FluxPipeline

    from ditserve.tiny.flux import TinyFluxSpec, make_tiny_flux

    spec = TinyFluxSpec(
        guidance_embeds=False,  # schnell-style: no guidance distillation to do
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        axes_dims_rope=cfg.axes_dims_rope,
        latent_channels=cfg.latent_channels,
        vae_block_out_channels=cfg.vae_channels,
        text_dim=cfg.text_dim,
        dynamic_shift=False,
        seed=cfg.seed,
    )
    make_tiny_flux(workdir, spec)
    pipe = FluxPipeline.from_pretrained(workdir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise drawn on the CPU from the one generator, then moved: the same draws whatever the device."""
    return torch.randn(x.shape, generator=gen).to(x.device)


def train_vae(vae: nn.Module, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch_size,), generator=gen).to(images.device)]
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
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae {step:5d}  recon {rec.item():.4f}  kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image, in batches."""
    means, stds = [], []
    for chunk in images.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def prompt_embeddings(pipe, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5 sequences [10, forms, S, D] and CLIP pooled [10, forms, D] of every prompt, as the pipeline encodes them,
    then the T5 sequence [S, D] and CLIP pooled [D] of the negative prompt (the unconditional input of CFG)."""
    seqs, pooled = [], []
    for digit in range(10):
        prompts = [prompt(digit, form) for form in range(len(PROMPT_FORMS))]
        embeds, pool, _ = pipe.encode_prompt(prompts, None, max_sequence_length=cfg.max_sequence_length)
        seqs.append(embeds)
        pooled.append(pool)
    seqs_t, pooled_t = torch.stack(seqs), torch.stack(pooled)
    # The frozen random encoders must tell the prompts apart; a DiT cannot learn what the inputs do not carry.
    flat = pooled_t.flatten(0, 1)
    dist = torch.cdist(flat, flat) + torch.eye(len(flat), device=flat.device) * 1e9
    log(f"text: closest two pooled embeddings {dist.min().item():.3f} apart (norm {flat.norm(dim=1).mean():.3f})")
    empty_seq, empty_pooled, _ = pipe.encode_prompt(
        [cfg.negative_prompt], None, max_sequence_length=cfg.max_sequence_length
    )
    return seqs_t, pooled_t, empty_seq[0], empty_pooled[0]


def new_transformer(pipe, cfg: TrainConfig, gen: torch.Generator):
    """Our FluxTransformer, trainable, with diffusers' default init and adaLN-zero (blocks start as identities)."""
    from ditserve.loader.weights import load_checkpoint
    from ditserve.models.flux import FluxConfig, FluxTransformer, map_diffusers_key

    model = FluxTransformer(FluxConfig.from_dict(dict(pipe.transformer.config))).to(pipe.device)
    fresh = type(pipe.transformer).from_config(pipe.transformer.config)  # default init, seeded by the caller
    load_checkpoint(model, iter(fresh.state_dict().items()), map_diffusers_key, where="initial weights")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mod." in name or "norm_out" in name or name.startswith("proj_out"):
                p.zero_()
    return model.requires_grad_(True).train()


def train_dit(
    model: nn.Module,
    latents_mean: torch.Tensor,
    latents_std: torch.Tensor,
    labels: torch.Tensor,
    seqs: torch.Tensor,
    pooled: torch.Tensor,
    empty_seq: torch.Tensor,
    empty_pooled: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> nn.Module:
    """Flow matching on normalised latents; returns the moving average of the weights (what is saved).

    A `cfg.cfg_dropout` fraction of the samples gets the negative prompt's embeddings in place of its digit's.
    """
    from ditserve.pipelines.flux import latent_image_ids, pack_latents

    h = latents_mean.shape[-1]
    device = latents_mean.device
    img_ids = latent_image_ids(h // 2, h // 2, device, torch.float32)
    txt_ids = torch.zeros(seqs.shape[2], 3, device=device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.0)

    # Linear warm-up, then cosine decay to zero: the last steps refine at a small rate.
    def lr_factor(step: int) -> float:
        if step < cfg.dit_warmup:
            return (step + 1) / cfg.dit_warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.dit_warmup) / max(1, cfg.dit_steps - cfg.dit_warmup)))

    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n = len(labels)
    for step in range(cfg.dit_steps):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen).to(device)
        form = torch.randint(seqs.shape[1], (cfg.batch_size,), generator=gen).to(device)
        digit = labels[idx]
        # A fresh posterior sample each time: the VAE's noise is free augmentation.
        x0 = pack_latents(latents_mean[idx] + latents_std[idx] * randn_like(latents_mean[idx], gen))
        noise = randn_like(x0, gen)
        # Half logit-normal (as SD3/FLUX training: mid noise, where the shape is decided), half uniform (so the
        # last, low-noise steps that clean up the strokes are trained too).
        t = torch.where(
            torch.rand(cfg.batch_size, generator=gen) < 0.5,
            torch.sigmoid(torch.randn(cfg.batch_size, generator=gen)),
            torch.rand(cfg.batch_size, generator=gen),
        ).to(device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout).to(device)
        seq = torch.where(drop[:, None, None], empty_seq, seqs[digit, form])
        pool = torch.where(drop[:, None], empty_pooled, pooled[digit, form])
        pred = model(xt, seq, pool, t, img_ids, txt_ids)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == cfg.dit_steps - 1:
            log(f"dit {step:5d}  loss {loss.item():.4f}")
    return ema


def save_folder(pipe, ema: nn.Module, cfg: TrainConfig, out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditserve.models.flux import to_diffusers_state_dict

    pipe.to("cpu")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in to_diffusers_state_dict(ema).items()}
    missing, unexpected = pipe.transformer.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    # Static shift (schnell-style): the model is trained and sampled at one size.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=cfg.scheduler_shift, use_dynamic_shifting=False
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # diffusers records the temporary folder the pipeline was loaded from; drop it so reruns write the same files.
    for config in [out / "model_index.json", *out.glob("*/config.json")]:
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    defaults = {
        "sampling_defaults": {
            "height": cfg.image_size,
            "width": cfg.image_size,
            "num_inference_steps": cfg.num_inference_steps,
            "max_sequence_length": cfg.max_sequence_length,
            "true_cfg_scale": cfg.true_cfg_scale,
            "negative_prompt": cfg.negative_prompt,
        },
        "trained_with": asdict(cfg),
    }
    (out / SAMPLING_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


@contextlib.contextmanager
def training_settings() -> Iterator[None]:
    """Our Triton kernels have no backward: training takes their torch references (on CUDA too). Tiny weights and
    activations go subnormal during training, which is many times slower on CPUs. Both settings are undone after."""
    previous = os.environ.get("DITSERVE_DISABLE_TRITON")
    os.environ["DITSERVE_DISABLE_TRITON"] = "1"
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        if previous is None:
            os.environ.pop("DITSERVE_DISABLE_TRITON", None)
        else:
            os.environ["DITSERVE_DISABLE_TRITON"] = previous


def train(cfg: TrainConfig, out: Path, device: str = "cpu") -> Path:
    with training_settings():
        return _train(cfg, out, device)


def _train(cfg: TrainConfig, out: Path, device: str) -> Path:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    ink, labels_np = load_digits()
    images = upsample(ink, cfg.image_size).to(device)
    labels = torch.from_numpy(labels_np).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = base_pipeline(cfg, Path(tmp)).to(device)
    log(f"data: {len(labels)} images of {cfg.image_size}×{cfg.image_size}")

    train_vae(pipe.vae, images, cfg, gen)
    mean, std = encode_latents(pipe.vae, images)
    shift = mean.mean().item()
    scale = 1.0 / (mean - shift).std().item()
    pipe.vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    log(f"vae: shift_factor {shift}, scaling_factor {scale} ({time.time() - start:.0f} s so far)")

    seqs, pooled, empty_seq, empty_pooled = prompt_embeddings(pipe, cfg)
    model = new_transformer(pipe, cfg, gen)
    latents = (mean - shift) * scale, std * scale
    ema = train_dit(model, *latents, labels, seqs, pooled, empty_seq, empty_pooled, cfg, gen)
    save_folder(pipe, ema, cfg, out)
    log(f"wrote {out} in {time.time() - start:.0f} s")
    return out


def evaluate(folder: Path, seeds: int = 4, device: str = "cpu") -> None:
    from ditserve import Engine
    from ditserve.digits.quality import score_images

    engine = Engine.from_pretrained(str(folder), device=device, dtype="float32")
    images, digits = [], []
    for d in range(10):
        result = engine.generate(prompt(d), seed=1000 + d, num_images=seeds)
        images += result.images
        digits += [d] * seeds
    log(f"accuracy (float32, {seeds} images per digit): {score_images(images, digits).summary()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditserve.digits.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the model to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    p.add_argument("--dit-steps", type=int, default=TrainConfig.dit_steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    p.add_argument("--no-eval", action="store_true", help="skip scoring the written model")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: the same weights whatever the machine's count)"
    )
    ns = p.parse_args(argv)
    # One thread by default: results do not depend on how work is split, and on a shared or busy CPU one thread is
    # steadier than several waiting on each other.
    torch.set_num_threads(ns.threads)
    cfg = TrainConfig(seed=ns.seed, vae_steps=ns.vae_steps, dit_steps=ns.dit_steps, batch_size=ns.batch_size)
    out = train(cfg, Path(ns.out), ns.device)
    if not ns.no_eval:
        evaluate(out, device=ns.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
