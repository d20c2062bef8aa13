"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024) for EmerDiff (docs/method.md §2).

Every timestep gets its own independently noised x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε_t; the noise z_t is then solved
so that the DDPM posterior step from x_t lands exactly on the next x_{t'}. Branches that share (x_{t_m}, z)
differ only by what is done to the U-Net.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import Tensor

# unet_fn(x, t, steps) -> model output (ε or v): x stacks the latents of `steps` (indices into
# Trajectory.timesteps) step-major, len(steps)·B rows; t holds each row's timestep
UNetFn = Callable[[Tensor, Tensor, list[int]], Tensor]


@dataclass
class Trajectory:
    timesteps: list[int]  # t_m = timesteps[0] > … > timesteps[-1]; the step after the last lands on t = 0
    latents: Tensor  # (S, B, C, h, w): x_t for each timestep
    noise: Tensor  # (S, B, C, h, w): z_t, zero where the posterior variance is zero (the final step)
    final: Tensor  # (B, C, h, w): x_0 reached by the unmodified run (the last step is deterministic)


class NoiseSchedule:
    """ᾱ, posterior mean and variance of a DDPM scheduler between two arbitrary timesteps t > t'."""

    def __init__(self, scheduler: DDPMScheduler):
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)"
            )

    def alpha_cumprod(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def predicted_x0(self, x_t: Tensor, model_output: Tensor, t: int) -> Tensor:
        a = self.alpha_cumprod(t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a) ** 0.5 * model_output) / a**0.5
        return a**0.5 * x_t - (1 - a) ** 0.5 * model_output  # v-prediction

    def posterior_mean(self, x_t: Tensor, x0: Tensor, t: int, t_prev: int) -> Tensor:
        a_t, a_prev = self.alpha_cumprod(t), self.alpha_cumprod(t_prev)
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        return (a_prev**0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t**0.5 * (1 - a_prev) / (1 - a_t)) * x_t

    def posterior_std(self, t: int, t_prev: int) -> float:
        a_t, a_prev = self.alpha_cumprod(t), self.alpha_cumprod(t_prev)
        return ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

    def add_noise(self, x0: Tensor, noise: Tensor, t: int) -> Tensor:
        a = self.alpha_cumprod(t)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def step(self, x_t: Tensor, model_output: Tensor, t: int, t_prev: int, z: Tensor) -> Tensor:
        """One DDPM posterior step with the given noise: x_{t'} = μ(x_t, x̂_0) + σ_t·z."""
        mean = self.posterior_mean(x_t, self.predicted_x0(x_t, model_output, t), t, t_prev)
        return mean + self.posterior_std(t, t_prev) * z


def denoising_timesteps(
    scheduler: DDPMScheduler, num_inference_steps: int, start: int, num_steps: int | None = None
) -> list[int]:
    """The schedule's timesteps from `start` (t_m) down to the last one; `num_steps` keeps that many, evenly spaced.

    Raises with the valid values when `start` is not a timestep of the schedule.
    """
    scheduler.set_timesteps(num_inference_steps)
    schedule = [int(t) for t in scheduler.timesteps]
    if start not in schedule:
        raise ValueError(
            f"timestep {start} is not on the {num_inference_steps}-step schedule; valid: {schedule}"
        )
    tail = schedule[schedule.index(start) :]
    if num_steps is None or num_steps >= len(tail):
        return tail
    if num_steps < 1:
        raise ValueError(f"steps after modulation must be ≥ 1, got {num_steps}")
    picks = torch.linspace(0, len(tail) - 1, num_steps).round().long().tolist()
    return [tail[i] for i in picks]


def sample_trajectory_latents(
    schedule: NoiseSchedule, x0: Tensor, timesteps: Sequence[int], generators: Sequence[torch.Generator]
) -> Tensor:
    """Independent x_t for every timestep (S, B, C, h, w); image b's noise comes from generators[b] (CPU).

    Draw for the whole schedule, then index: the noise of a timestep must not depend on which subset is used."""
    noise = torch.stack(
        [torch.randn((len(timesteps), *x0.shape[1:]), generator=g, dtype=torch.float32) for g in generators],
        dim=1,
    ).to(device=x0.device)
    return torch.stack([schedule.add_noise(x0.float(), noise[s], t) for s, t in enumerate(timesteps)])


@torch.no_grad()
def invert(
    unet_fn: UNetFn,
    schedule: NoiseSchedule,
    latents: Tensor,
    timesteps: Sequence[int],
    steps_per_call: int = 1,
) -> Trajectory:
    """Edit-friendly noise for given trajectory latents (S, B, C, h, w): solve each z_t so that the unmodified
    run from x_t steps exactly onto x_{t'}; `final` is where that run lands at t = 0.

    Every x_t is given, so the U-Net calls of different steps are independent: `steps_per_call` steps go
    through the U-Net as one batch (a batch-1 call leaves a GPU mostly idle)."""
    num_steps, batch = latents.shape[:2]
    outputs = []
    for start in range(0, num_steps, max(1, steps_per_call)):
        steps = list(range(start, min(num_steps, start + max(1, steps_per_call))))
        t = torch.tensor([timesteps[s] for s in steps], device=latents.device).repeat_interleave(batch)
        out = unet_fn(latents[steps[0] : steps[-1] + 1].flatten(0, 1), t, steps)
        outputs.append(out.float().unflatten(0, (len(steps), batch)))
    model_outputs = torch.cat(outputs)
    noise = torch.zeros_like(latents)
    final = latents[-1]
    for s, t in enumerate(timesteps):
        t_prev = timesteps[s + 1] if s + 1 < len(timesteps) else -1
        mean = schedule.posterior_mean(
            latents[s], schedule.predicted_x0(latents[s], model_outputs[s], t), t, t_prev
        )
        sigma = schedule.posterior_std(t, t_prev)
        if t_prev < 0:
            final = mean
        elif sigma > 0:
            noise[s] = (latents[s + 1] - mean) / sigma
    return Trajectory(timesteps=list(timesteps), latents=latents, noise=noise, final=final)


__all__ = ["NoiseSchedule", "Trajectory", "denoising_timesteps", "invert", "sample_trajectory_latents"]
