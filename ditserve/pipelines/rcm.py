"""rCM's few-step sampler (TurboDiffusion's distilled Wan models: 1 to 4 steps), as a scheduler the Wan denoising
loop steps like diffusers' own.

rCM (Zheng et al. 2025, NVlabs/rcm) distils a flow-matching model into a consistency model over TrigFlow time
θ ∈ [0, π/2]. TurboDiffusion samples it at θ = atan(sigma_max), then at the fixed 1.5, 1.4, 1.0 (the first
num_steps − 1 of them), then 0, each converted to the rectified-flow time the model was trained on,
t = sin θ / (cos θ + sin θ). The latents start as noise · t₀ (sigma_max 80: t₀ = 80/81), and each step predicts the
velocity v at t (the model's timestep is 1000·t), takes the clean estimate x − t·v and noises it afresh to the next
time: x ← (1 − t') (x − t v) + t' ε, with new noise ε every step (none at the last, t' = 0). All in float64 as
published; the model sees its dtype.

The step noise comes from one generator per request, seeded with the request's seed, that first drew the initial
noise: the published loop's stream of draws (it draws on the GPU's generator; ditserve draws on the CPU, as it does
for all initial noise, so that every device gives the same numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# TurboDiffusion's intermediate TrigFlow times ("for better visual quality"), the first num_steps − 1 of them.
MID_TIMES = (1.5, 1.4, 1.0)
DEFAULT_SIGMA_MAX = 80.0
MAX_STEPS = len(MID_TIMES) + 1
NUM_TRAIN_TIMESTEPS = 1000


def rcm_times(num_steps: int, sigma_max: float) -> torch.Tensor:
    """[num_steps + 1] rectified-flow times from t₀ < 1 down to 0, float64."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"rCM samples in 1 to {MAX_STEPS} steps, not {num_steps}")
    theta = torch.tensor([math.atan(sigma_max), *MID_TIMES[: num_steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(theta) / (torch.cos(theta) + torch.sin(theta))


def rcm_step(
    x: torch.Tensor, velocity: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One step, float64: the clean estimate x − t·v noised to t_next with `noise`."""
    x, velocity = x.double(), velocity.double()
    return (1 - t_next) * (x - t * velocity) + t_next * noise.double()


@dataclass
class RCMScheduler:
    """rCM's loop in the interface the Wan pipeline's denoise loop uses: `timesteps` (the model's, 1000·t, float32),
    `step(model_output, timestep, sample, return_dict=False)`, `config.num_train_timesteps`."""

    num_steps: int
    sigma_max: float = DEFAULT_SIGMA_MAX
    device: torch.device | str = "cpu"
    # One (generator, samples) per request of the batch, in batch order (see `seed_noise`).
    generators: list[tuple[torch.Generator, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.times = rcm_times(self.num_steps, self.sigma_max)
        self.timesteps = (self.times[:-1] * NUM_TRAIN_TIMESTEPS).float().to(self.device)
        self.config = type("RCMConfig", (), {"num_train_timesteps": NUM_TRAIN_TIMESTEPS})()
        self._index = 0

    def seed_noise(self, seeds_and_counts: list[tuple[int, int]], shape: tuple[int, ...]) -> None:
        """A generator per request, advanced past its initial noise of `shape` per sample (as the pipeline drew
        it), so that step noise continues the request's own stream."""
        self.generators = []
        for seed, count in seeds_and_counts:
            generator = torch.Generator("cpu").manual_seed(seed)
            torch.randn((count, *shape), generator=generator, dtype=torch.float32)
            self.generators.append((generator, count))

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The first latents: noise · t₀, float64."""
        return noise.double() * self.times[0].item()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        t, t_next = self.times[self._index].item(), self.times[self._index + 1].item()
        self._index += 1
        if t_next > 0:
            if not self.generators:
                raise RuntimeError("RCMScheduler.seed_noise was not called: no generator for the step noise")
            shape = sample.shape[1:]
            noise = torch.cat([torch.randn((n, *shape), generator=g, dtype=torch.float32) for g, n in self.generators])
            noise = noise.to(sample.device)
        else:
            noise = torch.zeros((), device=sample.device)
        return (rcm_step(sample, model_output, t, t_next, noise),)


__all__ = ["DEFAULT_SIGMA_MAX", "MAX_STEPS", "RCMScheduler", "rcm_step", "rcm_times"]
