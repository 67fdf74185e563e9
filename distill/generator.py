"""The one-step (or few-step) student: a trainable copy of the teacher UNet that predicts clean latents.

The teacher's parameterisation (epsilon, v_prediction or sample) and its alphas_cumprod are kept,
so at initialisation the student's one-step output is exactly the teacher's one-step DDIM x0
prediction at the last timestep (trailing spacing, t = T-1). Evaluating at t=1 instead, as DDIM's
default "leading" spacing does for one step, would treat pure noise as an almost clean image.

A student of N steps (1 to 4) samples as ADD/LCM-style students do: predict x0 at the first grid
timestep, re-noise it with fresh noise to the next grid timestep, predict again, and so on
(`few_step_sample`). Its grid is the one diffusers' LCMScheduler makes with
`original_inference_steps=N` (`NoiseSchedule.student_grid`), and `student_scheduler` builds that
LCMScheduler with every kwarg pinned, so a stock `DiffusionPipeline` with it runs exactly the
training-time sampler (distill export; tests/distill/test_few_step_export.py holds them equal).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from d2g.teacher.noise import sample_seed
from d2g.teacher.schedulers import TEACHER_KEYS
from distill.conditioning import Conditioning

# Every LCMScheduler kwarg that is not the teacher's noise schedule, pinned (from_config would
# carry kwargs such as timestep_spacing or steps_offset across classes). LCM's step is
# `denoised = c_out * x0 + c_skip * x_t`, then `sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise`
# with fresh noise (none after the last step): our sampler exactly when c_out = 1 and c_skip = 0.
# c_skip = 0.25 / ((s t)^2 + 0.25) and c_out = s t / sqrt((s t)^2 + 0.25) with s = timestep_scaling:
# at s = 1e10 and any t >= 1, c_out is 1.0 exactly in float64 and c_skip < 3e-21 (lost in float32
# next to any x0 larger than 1e-12). A student grid never contains t = 0 (its smallest timestep is
# T/N - 1 >= 249 for T = 1000, N <= 4), where c_skip would be 1. LCMScheduler reads neither
# steps_offset nor timestep_spacing: steps_offset=1 only keeps StableDiffusionPipeline from warning
# that the config is "outdated", and "trailing" says what the grid is to a reader.
STUDENT_SCHEDULER_KWARGS: dict[str, Any] = dict(
    clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=1, thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="trailing", timestep_scaling=1e10,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What draws the fresh noise between steps: one generator, one per sample, or torch's global RNG.
Generators = torch.Generator | list[torch.Generator] | None


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
        """Timesteps [T-1, T-1-T/N, ...] as diffusers' timestep_spacing='trailing' makes them (the
        teacher's DDIM grid; the student's own is `student_grid`)."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"student steps must be in [1, {self.num_train_timesteps}], got {steps}")
        ratio = self.num_train_timesteps / steps
        return [int(round(self.num_train_timesteps - i * ratio)) - 1 for i in range(steps)]

    def student_grid(self, steps: int, trained_steps: int | None = None) -> list[int]:
        """The timesteps a student trained for `trained_steps` (default: `steps`) samples at in `steps`.

        The trained grid is LCMScheduler's with original_inference_steps=N: k = T // N, timesteps
        [N k - 1, (N-1) k - 1, ..., k - 1], i.e. [999, 749, 499, 249] for N = 4 and T = 1000, the
        trailing grid whenever N divides T (for N = 3: [998, 665, 332], not trailing's
        [999, 666, 332], which no LCMScheduler config gives). Fewer steps than trained take LCM's
        evenly spaced subset of the trained grid (index floor(i N / steps)), so the student only
        ever sees timesteps it was trained at. ValueError unless 1 <= steps <= trained_steps <= T.
        """
        trained = steps if trained_steps is None else trained_steps
        if not 1 <= trained <= self.num_train_timesteps:
            raise ValueError(f"student steps must be in [1, {self.num_train_timesteps}], got {trained}")
        if not 1 <= steps <= trained:
            raise ValueError(f"student steps must be in [1, {trained}] for a student trained for {trained} "
                             f"step{'s' if trained > 1 else ''}, got {steps}")
        k = self.num_train_timesteps // trained
        trained_grid = [(trained - j) * k - 1 for j in range(trained)]
        return [trained_grid[(i * trained) // steps] for i in range(steps)]


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
    def sample(self, noise: torch.Tensor, cond: Conditioning, steps: int = 1, generator: Generators = None,
               trained_steps: int | None = None) -> torch.Tensor:
        """`steps`-step sampling of a student trained for `trained_steps` (default: `steps`) from
        `noise` (see `few_step_sample`; `generator` draws the fresh noise between steps)."""
        grid = self.schedule.student_grid(steps, trained_steps)
        return few_step_sample(lambda x, t: self(x, t, cond), self.schedule, noise, grid, generator)



def few_step_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                    noise: torch.Tensor, grid: list[int], generator: Generators = None) -> torch.Tensor:
    """The student's sampler: x0 = denoise(x, t) at each timestep of `grid` (x = `noise` first),
    re-noised to the next grid timestep with fresh noise, the last x0 returned (float32).

    The fresh noise is drawn as LCMScheduler.step draws it, with diffusers' `randn_tensor` (a
    float32 tensor of the batch's shape; a list of generators gives one per sample; a CPU
    generator draws on the CPU), one draw per step after the first, so a stock pipeline given the
    same `latents` and `generator` draws the very same numbers. `generator` None: torch's global RNG.
    """
    from diffusers.utils.torch_utils import randn_tensor

    x = noise
    x0 = noise
    for i, t in enumerate(grid):
        ts = torch.full((noise.shape[0],), t, device=noise.device, dtype=torch.long)
        x0 = denoise(x, ts).float()
        if i + 1 < len(grid):
            fresh = randn_tensor(tuple(x0.shape), generator=generator, device=x0.device, dtype=torch.float32)
            x = schedule.add_noise(x0, fresh, torch.full_like(ts, grid[i + 1]))
    return x0


def student_scheduler(teacher_scheduler_config: dict, student_steps: int):
    """The stock diffusers scheduler that runs `few_step_sample` for a student of `student_steps`:
    an LCMScheduler with the teacher's noise schedule (d2g.teacher.schedulers.TEACHER_KEYS), the
    pinned STUDENT_SCHEDULER_KWARGS and original_inference_steps=student_steps, so its
    `set_timesteps(n)` gives `NoiseSchedule.student_grid(n, student_steps)` and refuses n larger
    than the steps the student was trained for. Built from explicit kwargs only (never from_config)."""
    from diffusers import LCMScheduler

    if not 1 <= student_steps <= 4:
        raise ValueError(f"student_steps must be 1 to 4, got {student_steps}")
    config = dict(teacher_scheduler_config)
    kwargs = {k: config[k] for k in TEACHER_KEYS if k in config}
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
    return LCMScheduler(**kwargs, **STUDENT_SCHEDULER_KWARGS, original_inference_steps=student_steps)


def trained_steps_of(scheduler) -> int:
    """The steps the student behind an exported pipeline's scheduler was trained for: its LCM
    scheduler's original_inference_steps; 1 for exports older than few-step support (DDIM)."""
    if type(scheduler).__name__ == "LCMScheduler":
        return int(scheduler.config.original_inference_steps)
    return 1


def seeded_noise(seed: int, indices: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting noises and between-step generators for samples `indices`: sample j's generator is
    seeded with d2g.teacher.noise.sample_seed(seed, j), draws j's starting noise first (equal to
    d2g.teacher.noise.sample_noise(seed, j, shape)) and then, continuing, its between-step noise.
    So a stock pipeline called with `generator=` these generators freshly seeded (and no latents)
    draws the same starting noise and the same between-step noise: image j is reproducible by
    (seed, j) alone, whatever the batch."""
    generators = [torch.Generator(device="cpu").manual_seed(sample_seed(seed, j)) for j in indices]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def noise_keyed_generators(noise: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the bytes of that sample's starting noise: the
    between-step noise of a sample is then a pure function of its starting noise (deterministic
    evaluation without indices, the same whatever the batch it comes in)."""
    import xxhash

    flat = noise.detach().to("cpu", torch.float32).contiguous()
    return [torch.Generator(device="cpu").manual_seed(xxhash.xxh64_intdigest(row.numpy().tobytes())
                                                      & 0x7FFF_FFFF_FFFF_FFFF) for row in flat]
