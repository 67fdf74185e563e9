"""The one-step (or few-step) student: a trainable copy of the teacher UNet that predicts clean latents.

The teacher's parameterisation (epsilon, v_prediction or sample) and its alphas_cumprod are kept,
so at initialisation the student's one-step output is exactly the teacher's one-step DDIM x0
prediction at the last timestep (trailing spacing, t = T-1). Evaluating at t=1 instead, as DDIM's
default "leading" spacing does for one step, would treat pure noise as an almost clean image.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from distill.conditioning import Conditioning

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule(nn.Module):
    """The teacher's discrete VP schedule: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, a_t = alphas_cumprod[t].

    Args:
        scheduler: the teacher's diffusers scheduler (DDPM/DDIM/Euler-type, with alphas_cumprod);
            ValueError otherwise or for an unknown prediction_type.
    """

    def __init__(self, scheduler):
        super().__init__()
        config = scheduler.config
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"teacher scheduler prediction_type {prediction!r} is not one of {PREDICTION_TYPES}")
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"teacher scheduler {type(scheduler).__name__} has no alphas_cumprod; "
                "a discrete VP (DDPM/DDIM/Euler-type) schedule is required"
            )
        self.prediction_type = prediction
        self.num_train_timesteps = int(config.num_train_timesteps)
        alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        # Kept float64 on the side and read in float32: autocast never touches buffers we index.
        self.register_buffer("alphas_cumprod", alphas.float(), persistent=False)

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) per sample, float32, shaped to broadcast against `like`."""
        a = self.alphas_cumprod.to(like.device)[timesteps.long()].float()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t from clean latents, noise and per-sample timesteps (in x0's dtype)."""
        alpha, sigma = self.coefficients(timesteps, x0)
        return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Convert the UNet's prediction to the clean latent (in float32 for stability under autocast)."""
        alpha, sigma = self.coefficients(timesteps, x_t)
        out, x = model_output.float(), x_t.float()
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * out
        return out

    def trailing_grid(self, steps: int) -> list[int]:
        """Timesteps [T-1, T-1-T/N, ...] as diffusers' timestep_spacing='trailing' makes them."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"student steps must be in [1, {self.num_train_timesteps}], got {steps}")
        ratio = self.num_train_timesteps / steps
        return [int(round(self.num_train_timesteps - i * ratio)) - 1 for i in range(steps)]


class OneStepGenerator(nn.Module):
    """Student G(x_t, t, c) -> x0. One step from pure noise at t = T-1 by default.

    Args:
        teacher_unet: the teacher's UNet; copied (float32, trainable), not modified.
        scheduler: the teacher's scheduler, for its NoiseSchedule and parameterisation.
        gradient_checkpointing: recompute the copy's activations in backward.
    """

    def __init__(self, teacher_unet: nn.Module, scheduler, gradient_checkpointing: bool = False):
        super().__init__()
        self.unet = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = NoiseSchedule(scheduler)

    @property
    def last_timestep(self) -> int:
        """T-1: the timestep a one-step student denoises pure noise at."""
        return self.schedule.num_train_timesteps - 1

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor | None, cond: Conditioning) -> torch.Tensor:
        """Predict the clean latent from x_t at `timesteps` (None: the last timestep, x_t = noise)."""
        if timesteps is None:
            timesteps = torch.full((x_t.shape[0],), self.last_timestep, device=x_t.device, dtype=torch.long)
        dtype = next(self.unet.parameters()).dtype
        pred = self.unet(x_t.to(dtype), timesteps, **cond.to(dtype).unet_kwargs()).sample
        return self.schedule.to_x0(pred, x_t, timesteps)

    @torch.no_grad()
    def sample(
        self, noise: torch.Tensor, cond: Conditioning, steps: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Few-step sampling on the trailing grid; fresh noise between steps, deterministic given `generator`."""
        grid = self.schedule.trailing_grid(steps)
        x = noise
        x0 = noise
        for i, t in enumerate(grid):
            ts = torch.full((noise.shape[0],), t, device=noise.device, dtype=torch.long)
            x0 = self(x, ts, cond)
            if i + 1 < len(grid):
                fresh = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32)
                nxt = torch.full_like(ts, grid[i + 1])
                x = self.schedule.add_noise(x0, fresh.to(x0.device), nxt)
        return x0
