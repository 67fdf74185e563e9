"""Run the teacher's own deterministic ODE solve from given noise to a latent.

The pipeline itself runs the solve (output_type="latent", the VAE decoder never runs), so a stored
latent is exactly what the teacher would produce; around it this module adds what a bulk run
needs: pinned schedulers, prompts encoded once per batch with the negative embedding cached,
guidance batched into one UNet call (the pipeline's own), trajectory capture, and the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d2g.teacher.schedulers import CALL_KWARGS, build_scheduler, solver_kwargs
from d2g.teacher.vae import latent_shape
from store import LATENT, NOISE, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TRAJECTORY


@dataclass(frozen=True)
class SolverSettings:
    """How the teacher solves, and which extra arrays the solve returns.

    Args:
        scheduler: the ODE solver, "ddim", "dpmpp" or "euler" (kwargs pinned in d2g.teacher.schedulers).
        steps: solver steps.
        timestep_spacing: the timestep grid, "trailing", "leading" or "linspace".
        guidance: classifier-free guidance scale; <= 1 disables guidance.
        guidance_rescale: the pipeline's guidance rescale phi.
        negative_prompt: the negative prompt; "" applies the pipeline's own empty-prompt rule.
        height: image height in pixels; None: the teacher's default.
        width: image width in pixels; None: the teacher's default.
        store_prompt_embeds: also return the prompt embeddings (and pooled ones for SDXL).
        trajectory_points: also return this many intermediate ODE points per sample.
    """

    scheduler: str = "ddim"
    steps: int = 50
    timestep_spacing: str = "trailing"
    guidance: float = 3.0
    guidance_rescale: float = 0.0
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    store_prompt_embeds: bool = False
    trajectory_points: int = 0


def _numpy_dtype_of(dtype: torch.dtype) -> str:
    # numpy has no bfloat16: bf16 tensors are stored as their exact float32 upcast.
    return {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "float32"}[dtype]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """`t` as a contiguous CPU array; bf16 becomes its exact float32 upcast (numpy has no bf16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def trajectory_steps(num_steps: int, points: int) -> list[int]:
    """Indices (0-based, after which step) of K evenly spaced intermediate points, final excluded."""
    if points <= 0:
        return []
    if points >= num_steps:
        raise ValueError(f"trajectory_points={points} must be smaller than steps={num_steps}")
    return sorted({int(round(k * num_steps / (points + 1))) - 1 for k in range(1, points + 1)})


class TeacherSolver:
    """Bound to one loaded pipeline; call `solve(prompts, noise)` per batch.

    Args:
        pipe: a loaded diffusers SD or SDXL pipeline; its scheduler is replaced by the pinned solver.
        settings: the SolverSettings every solve uses.
    """

    def __init__(self, pipe, settings: SolverSettings):
        self.pipe = pipe
        self.settings = settings
        self.scheduler_kwargs = solver_kwargs(settings.scheduler, dict(pipe.scheduler.config), settings.timestep_spacing)
        pipe.scheduler = build_scheduler(settings.scheduler, dict(pipe.scheduler.config), settings.timestep_spacing)
        self.dtype = pipe.unet.dtype
        self.device = pipe.unet.device
        self.latent_shape = latent_shape(pipe, settings.height, settings.width)
        self.height = self.latent_shape[1] * pipe.vae_scale_factor
        self.width = self.latent_shape[2] * pipe.vae_scale_factor
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self._negative = None
        self._trajectory_at = trajectory_steps(settings.steps, settings.trajectory_points)

    @property
    def guided(self) -> bool:
        """Whether guidance is on (scale > 1), so each solve also needs the negative embedding."""
        return self.settings.guidance > 1.0

    @property
    def tokenizer_max_length(self) -> int:
        """Tokens of a prompt the pipeline keeps; longer prompts are truncated."""
        return self.pipe.tokenizer.model_max_length

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts longer than the tokenizer's limit; the pipeline truncates them as it always does."""
        ids = self.pipe.tokenizer(prompts, truncation=False).input_ids
        return sum(len(x) > self.tokenizer_max_length for x in ids)

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """field -> (numpy dtype, per-sample shape) for every array this solver produces."""
        stored = _numpy_dtype_of(self.dtype)
        # noise is stored as the exact tensor the solve started from (cast to the teacher dtype).
        fields = {NOISE: (stored, self.latent_shape), LATENT: (stored, self.latent_shape)}
        if self.settings.store_prompt_embeds:
            dim = self.pipe.unet.config.cross_attention_dim
            fields[PROMPT_EMBEDS] = (stored, (self.tokenizer_max_length, dim))
            if self.is_sdxl:
                fields[POOLED_PROMPT_EMBEDS] = (stored, (self.pipe.text_encoder_2.config.projection_dim,))
        if self._trajectory_at:
            fields[TRAJECTORY] = (stored, (len(self._trajectory_at), *self.latent_shape))
        return fields

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
        embeds = {PROMPT_EMBEDS: out[0]}
        if len(out) == 4:
            embeds[POOLED_PROMPT_EMBEDS] = out[2]
        return embeds

    def _negative_embeds(self) -> dict[str, torch.Tensor]:
        # Encoded once per worker, by the pipeline's own rules (e.g. SDXL's zeros for "").
        if self._negative is None:
            out = self.pipe.encode_prompt(prompt=["-"], device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=True,
                                          negative_prompt=self._negative_prompt())
            self._negative = {"negative_prompt_embeds": out[1]}
            if len(out) == 4:
                self._negative["negative_pooled_prompt_embeds"] = out[3]
        return self._negative

    def _negative_prompt(self) -> list[str] | None:
        # None, not [""], so pipelines with special empty-prompt rules (SDXL's zeros) apply them.
        return [self.settings.negative_prompt] if self.settings.negative_prompt else None

    @torch.no_grad()
    def solve(self, prompts: list[str], noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """noise: [B, C, h, w] unit Gaussian (float32, CPU). Returns per-field batched tensors."""
        if tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise shape {tuple(noise.shape[1:])} does not match the teacher's latent shape {self.latent_shape}")
        start = noise.to(device=self.device, dtype=self.dtype)
        embeds = self._encode(prompts)
        kwargs = dict(embeds)
        if self.guided:
            batch = len(prompts)
            kwargs.update({k: v.expand(batch, *v.shape[1:]) for k, v in self._negative_embeds().items()})
        trajectory: list[torch.Tensor] = []
        if self._trajectory_at:
            wanted = set(self._trajectory_at)

            def capture(pipe, step_index, timestep, callback_kwargs):
                if step_index in wanted:
                    trajectory.append(callback_kwargs["latents"].clone())
                return callback_kwargs

            kwargs.update(callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"])
        result = self.pipe(
            latents=start, num_inference_steps=self.settings.steps, guidance_scale=self.settings.guidance,
            guidance_rescale=self.settings.guidance_rescale, height=self.height, width=self.width,
            output_type="latent", return_dict=True, **CALL_KWARGS[self.settings.scheduler], **kwargs,
        )
        out = {NOISE: start, LATENT: result.images}
        if self.settings.store_prompt_embeds:
            out.update(embeds)
        if trajectory:
            out[TRAJECTORY] = torch.stack(trajectory, dim=1)
        return out

    def trajectory_timesteps(self) -> list[int]:
        """The timestep of each trajectory point (the one the next step starts from), for the
        store's metadata; [] when no trajectory is stored. Call after `solve`, which sets them."""
        timesteps = self.pipe.scheduler.timesteps
        if timesteps is None or not self._trajectory_at:
            return []
        return [int(timesteps[i + 1]) for i in self._trajectory_at if i + 1 < len(timesteps)]
