"""Run the teacher's own deterministic ODE solve from given noise to a latent.

The pipeline itself runs the solve (output_type="latent", the VAE decoder never runs), so a stored
latent is exactly what the teacher would produce; around it this module adds what a bulk run
needs: pinned schedulers, prompts encoded once per batch with the negative embedding cached,
guidance batched into one denoiser call (the pipeline's own), trajectory capture, and the schema.

UNet teachers (SD1.5/SDXL-style) and flow-matching transformer teachers (SD3- and FLUX-style) run
the same way. Noise and latents are always [C, h, w]; for FLUX the noise is packed into the
pipeline's 2x2 token layout with its own packing, and the result unpacked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from d2g.teacher.flow import DEFAULT_MAX_SEQUENCE_LENGTH, FLUX, SD3, UNET, pack, teacher_kind, unpack
from d2g.teacher.schedulers import (
    CALL_KWARGS,
    FLOW_SCHEDULERS,
    FlowShift,
    SchedulerError,
    build_scheduler,
    flow_solver_kwargs,
    resolve_scheduler_name,
    solver_kwargs,
)
from d2g.teacher.vae import latent_shape
from store import LATENT, NOISE, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TRAJECTORY


@dataclass(frozen=True)
class SolverSettings:
    """How the teacher solves, and which extra arrays the solve returns.

    Args:
        scheduler: the ODE solver: "ddim", "dpmpp" or "euler" for UNet teachers, "flow_euler" or
            "flow_heun" for flow-matching ones, "auto" for the family's default (ddim / flow_euler);
            kwargs pinned in d2g.teacher.schedulers.
        steps: solver steps.
        timestep_spacing: the timestep grid of UNet solvers, "trailing", "leading" or "linspace".
        guidance: classifier-free guidance scale (UNet, SD3) or FLUX's embedded guidance scale;
            for CFG, <= 1 disables it.
        guidance_rescale: the pipeline's guidance rescale phi (UNet teachers only).
        negative_prompt: the negative prompt; "" applies the pipeline's own empty-prompt rule.
        height: image height in pixels; None: the teacher's default.
        width: image width in pixels; None: the teacher's default.
        store_prompt_embeds: also return the prompt embeddings (and pooled ones for SDXL, SD3, FLUX).
        trajectory_points: also return this many intermediate ODE points per sample.
        flow: overrides of a flow-matching teacher's sigma shifting (None fields: the teacher's).
        true_cfg: FLUX's true classifier-free guidance scale (a second, negative-prompt pass); <= 1 off.
        max_sequence_length: T5 tokens of a prompt for SD3/FLUX; None: the pipeline's default.
    """

    scheduler: str = "auto"
    steps: int = 50
    timestep_spacing: str = "trailing"
    guidance: float = 3.0
    guidance_rescale: float = 0.0
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    store_prompt_embeds: bool = False
    trajectory_points: int = 0
    flow: FlowShift = field(default_factory=FlowShift)
    true_cfg: float = 1.0
    max_sequence_length: int | None = None


def check_settings(kind: str, settings: SolverSettings) -> None:
    """SchedulerError naming the option when `settings` ask something teachers of `kind` cannot do."""
    if kind == UNET:
        given = [f"flow_{k}" for k, v in settings.flow.__dict__.items() if v is not None]
        if settings.true_cfg > 1.0:
            given.append("true_cfg")
        if settings.max_sequence_length is not None:
            given.append("max_sequence_length")
        if given:
            raise SchedulerError(f"option {given[0]}: applies only to flow-matching (SD3/FLUX-style) teachers; "
                                 "this teacher is a UNet")
        return
    if settings.guidance_rescale > 0.0:
        raise SchedulerError("option guidance_rescale: the SD3 and FLUX pipelines have no guidance rescale; set it to 0")
    if kind == SD3 and settings.true_cfg > 1.0:
        raise SchedulerError("option true_cfg: applies only to FLUX-style teachers; SD3's classifier-free guidance "
                             "scale is option guidance")
    if kind == FLUX and settings.scheduler == "flow_heun":
        raise SchedulerError("option scheduler: flow_heun cannot run a FLUX teacher (FluxPipeline passes its own sigma "
                             "grid, which FlowMatchHeunDiscreteScheduler does not take); use flow_euler")


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
        pipe: a loaded diffusers SD, SDXL, SD3 or FLUX pipeline; its scheduler is replaced by the
            pinned solver.
        settings: the SolverSettings every solve uses.
    """

    def __init__(self, pipe, settings: SolverSettings):
        self.pipe = pipe
        self.kind = teacher_kind(pipe)
        # A scheduler built in code (the one a solver installs) has no _class_name in its config, and
        # the class is what tells a flow teacher apart: a second solver on the same pipe needs it.
        teacher_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        self.scheduler_name = resolve_scheduler_name(settings.scheduler, teacher_config)
        self.settings = settings = replace(settings, scheduler=self.scheduler_name)
        check_settings(self.kind, settings)
        if self.scheduler_name in FLOW_SCHEDULERS:
            self.scheduler_kwargs = flow_solver_kwargs(self.scheduler_name, teacher_config, settings.flow)
        else:
            self.scheduler_kwargs = solver_kwargs(self.scheduler_name, teacher_config, settings.timestep_spacing)
        pipe.scheduler = build_scheduler(self.scheduler_name, teacher_config, settings.timestep_spacing, settings.flow)
        denoiser = pipe.unet if self.kind == UNET else pipe.transformer
        self.dtype = denoiser.dtype
        self.device = denoiser.device
        self.latent_shape = latent_shape(pipe, settings.height, settings.width)
        self.height = self.latent_shape[1] * pipe.vae_scale_factor
        self.width = self.latent_shape[2] * pipe.vae_scale_factor
        self.is_sdxl = self.kind == UNET and hasattr(pipe, "text_encoder_2")
        self.max_sequence_length = (None if self.kind == UNET else
                                    settings.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[self.kind])
        self._negative = None
        self._embeds_schema = None
        self._trajectory_at = trajectory_steps(settings.steps, settings.trajectory_points)

    @property
    def guided(self) -> bool:
        """Whether a negative-prompt pass runs (CFG scale > 1; for FLUX, true_cfg > 1), so each
        solve also needs the negative embedding. FLUX's embedded guidance needs none."""
        if self.kind == FLUX:
            return self.settings.true_cfg > 1.0
        return self.settings.guidance > 1.0

    @property
    def tokenizer_max_length(self) -> int:
        """Tokens of a prompt the pipeline keeps; longer prompts are truncated (CLIP's limit;
        T5's, max_sequence_length, for FLUX, whose token embeddings come from T5 alone)."""
        if self.kind == FLUX:
            return self.max_sequence_length
        return self.pipe.tokenizer.model_max_length

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts longer than the tokenizer's limit; the pipeline truncates them as it always does."""
        tokenizer = self.pipe.tokenizer_2 if self.kind == FLUX else self.pipe.tokenizer
        ids = tokenizer(prompts, truncation=False).input_ids
        return sum(len(x) > self.tokenizer_max_length for x in ids)

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """field -> (numpy dtype, per-sample shape) for every array this solver produces."""
        stored = _numpy_dtype_of(self.dtype)
        # noise is stored as the exact tensor the solve started from (cast to the teacher dtype).
        fields = {NOISE: (stored, self.latent_shape), LATENT: (stored, self.latent_shape)}
        if self.settings.store_prompt_embeds:
            if self.kind == UNET:
                dim = self.pipe.unet.config.cross_attention_dim
                fields[PROMPT_EMBEDS] = (stored, (self.tokenizer_max_length, dim))
                if self.is_sdxl:
                    fields[POOLED_PROMPT_EMBEDS] = (stored, (self.pipe.text_encoder_2.config.projection_dim,))
            else:
                fields.update({k: (stored, shape) for k, shape in self._flow_embeds_schema().items()})
        if self._trajectory_at:
            fields[TRAJECTORY] = (stored, (len(self._trajectory_at), *self.latent_shape))
        return fields

    def _flow_embeds_schema(self) -> dict[str, tuple[int, ...]]:
        # The shapes of the pipeline's own encoding (CLIP and T5 tokens side by side for SD3), read
        # off one encoded prompt rather than re-derived from configs.
        if self._embeds_schema is None:
            self._embeds_schema = {k: tuple(v.shape[1:]) for k, v in self._encode([""]).items()}
        return self._embeds_schema

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.kind == FLUX:
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
            return {PROMPT_EMBEDS: embeds, POOLED_PROMPT_EMBEDS: pooled}
        extra = {"prompt_2": None, "prompt_3": None, "max_sequence_length": self.max_sequence_length} \
            if self.kind == SD3 else {}
        out = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False, **extra)
        embeds = {PROMPT_EMBEDS: out[0]}
        if len(out) == 4:
            embeds[POOLED_PROMPT_EMBEDS] = out[2]
        return embeds

    def _negative_embeds(self) -> dict[str, torch.Tensor]:
        # Encoded once per worker, by the pipeline's own rules (e.g. SDXL's zeros for "").
        if self._negative is None:
            if self.kind == FLUX:
                # FluxPipeline runs true CFG only with a negative prompt given; "" is encoded as text.
                encoded = self._encode([self.settings.negative_prompt])
                self._negative = {"negative_prompt_embeds": encoded[PROMPT_EMBEDS],
                                  "negative_pooled_prompt_embeds": encoded[POOLED_PROMPT_EMBEDS]}
                return self._negative
            extra = {"prompt_2": None, "prompt_3": None, "max_sequence_length": self.max_sequence_length} \
                if self.kind == SD3 else {}
            out = self.pipe.encode_prompt(prompt=["-"], device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=True,
                                          negative_prompt=self._negative_prompt(), **extra)
            self._negative = {"negative_prompt_embeds": out[1]}
            if len(out) == 4:
                self._negative["negative_pooled_prompt_embeds"] = out[3]
        return self._negative

    def _negative_prompt(self) -> list[str] | None:
        # None, not [""], so pipelines with special empty-prompt rules (SDXL's zeros) apply them.
        return [self.settings.negative_prompt] if self.settings.negative_prompt else None

    def _call_kwargs(self) -> dict:
        """The pipeline arguments of this family that the settings decide."""
        s = self.settings
        kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance, height=self.height, width=self.width,
                      output_type="latent", return_dict=True, **CALL_KWARGS[self.scheduler_name])
        if self.kind == UNET:
            kwargs["guidance_rescale"] = s.guidance_rescale
        else:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if self.kind == FLUX:
            kwargs["true_cfg_scale"] = s.true_cfg
        return kwargs

    def _to_stored(self, latents: torch.Tensor) -> torch.Tensor:
        """A latent as the pipeline holds it -> [B, C, h, w] (FLUX: unpacked)."""
        return unpack(self.pipe, latents, self.height, self.width) if self.kind == FLUX else latents

    @torch.no_grad()
    def solve(self, prompts: list[str], noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """noise: [B, C, h, w] unit Gaussian (float32, CPU). Returns per-field batched tensors, latents
        [B, C, h, w] whatever layout the denoiser takes."""
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
            completed = [0]

            def capture(pipe, step_index, timestep, callback_kwargs):
                # A second-order solver (Heun) calls back twice per step; only a finished step,
                # the scheduler back in its first-order state, is a point of the trajectory.
                if getattr(pipe.scheduler, "state_in_first_order", True):
                    if completed[0] in wanted:
                        trajectory.append(self._to_stored(callback_kwargs["latents"]).clone())
                    completed[0] += 1
                return callback_kwargs

            kwargs.update(callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"])
        latents = pack(self.pipe, start) if self.kind == FLUX else start
        result = self.pipe(latents=latents, **self._call_kwargs(), **kwargs)
        out = {NOISE: start, LATENT: self._to_stored(result.images)}
        if self.settings.store_prompt_embeds:
            out.update(embeds)
        if trajectory:
            out[TRAJECTORY] = torch.stack(trajectory, dim=1)
        return out

    def trajectory_timesteps(self) -> list[int] | list[float]:
        """The timestep of each trajectory point (the one the next step starts from), for the
        store's metadata; [] when no trajectory is stored. Call after `solve`, which sets them.
        Flow-matching teachers: float timesteps, sigma * num_train_timesteps."""
        timesteps = self.pipe.scheduler.timesteps
        if timesteps is None or not self._trajectory_at:
            return []
        if self.kind == UNET:
            return [int(timesteps[i + 1]) for i in self._trajectory_at if i + 1 < len(timesteps)]
        # Heun repeats each timestep but the first for its two evaluations: one per step here.
        steps = torch.unique_consecutive(timesteps.cpu())
        return [float(steps[i + 1]) for i in self._trajectory_at if i + 1 < len(steps)]

