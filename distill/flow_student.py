"""Students of flow-matching transformer teachers (SD3- and FLUX-style pipelines).

The rectified-flow forward process is x_t = (1 - sigma) x0 + sigma eps, and the transformer predicts
the velocity v = eps - x0, so x0 = x_t - sigma v. `flow_velocity` calls the teacher's transformer
exactly as the stock pipelines do: StableDiffusion3Pipeline passes timestep = sigma * 1000 and the
joint text tokens plus the pooled projection; FluxPipeline packs the latent into 2x2 tokens, passes
timestep / 1000 (i.e. sigma), txt_ids / img_ids and, when the transformer has a guidance embedding,
`guidance`. Latents stay [B, C, h, w] everywhere outside that call (FLUX's packing is a permutation).

A student (`FlowGenerator`) is a trainable copy of the teacher transformer, run at sigma 1 for one
step (x0 = eps - v(eps, 1)). An N-step student (1 to 4) samples as LCM/ADD-style students do,
`flow_few_step_sample`: predict x0 at each sigma of its grid linspace(1, 1/N, N) (FluxPipeline's
own sigma rule, unshifted), re-noise it to the next sigma with fresh noise, x = (1 - s) x0 + s eps.
That is FlowMatchEulerDiscreteScheduler's `stochastic_sampling` step, so `flow_student_scheduler`
(shift 1, no dynamic shifting, stochastic sampling; every kwarg pinned) runs the same sampler in a
stock pipeline: one step evaluates sigma 1 and lands on x - v. The stock pipelines draw the
between-step noise from torch's global RNG (they pass no generator to `scheduler.step`), so N-step
sampling is reproduced by seeding torch, not by `generator=`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from d2g.teacher.flow import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    FLOW_KINDS,
    FLUX,
    SD3,
    pack_tokens,
    teacher_kind,
    unpack_tokens,
)
from distill.conditioning import Conditioning, ConditioningError, batch_prompts
from store import LATENT, NOISE, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS

NUM_TRAIN_TIMESTEPS = 1000
# FluxPipeline's default guidance_scale: the guidance-embedding value a FLUX student runs at unless
# the objective config says otherwise, so the stock pipeline's default call runs it right.
FLUX_DEFAULT_GUIDANCE = 3.5
# The student's stock scheduler: no shifting (the grid is the student's own), stochastic sampling
# (x0 = x - sigma v, re-noised to the next sigma with fresh noise; exactly x0 after the last step).
FLOW_STUDENT_SCHEDULER_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
    stochastic_sampling=True,
)
Draw = Callable[[tuple[int, ...], torch.device], torch.Tensor]


def is_flow_pipeline(pipe) -> bool:
    """Whether `pipe` is an SD3- or FLUX-style teacher (a transformer denoiser, no UNet)."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None \
        and teacher_kind(pipe) in FLOW_KINDS


def latent_channels(pipe) -> int:
    """Channels of the stored [C, h, w] latent (FLUX's transformer takes 4C packed channels)."""
    channels = int(pipe.transformer.config.in_channels)
    return channels // 4 if teacher_kind(pipe) == FLUX else channels


def size_factor(pipe) -> int:
    """What latent height and width must be multiples of: the patch size (SD3) or FLUX's 2x2 packing."""
    return 2 if teacher_kind(pipe) == FLUX else int(pipe.transformer.config.patch_size)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids for an unpacked h x w latent: (0, row, col) per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flow_velocity(transformer: nn.Module, kind: str, x_t: torch.Tensor, sigma: torch.Tensor,
                  cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity at x_t [B, C, h, w] and per-sample sigma [B], called as the stock
    SD3 / FLUX pipeline calls it; [B, C, h, w] in the transformer's dtype."""
    dtype = next(transformer.parameters()).dtype
    cond = cond.to(dtype)
    # The pipelines' timesteps are the scheduler's sigma * 1000 in float32: SD3 passes them as they
    # are, FLUX casts them to the latents' dtype and divides by 1000 again.
    t = (sigma.float() * NUM_TRAIN_TIMESTEPS).to(x_t.device)
    if kind == SD3:
        return transformer(hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    if kind != FLUX:
        raise ValueError(f"not a flow-matching teacher kind: {kind!r}")
    h, w = x_t.shape[-2:]
    guidance = cond.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype)
    out = transformer(hidden_states=pack_tokens(x_t.to(dtype)), timestep=t.to(dtype) / NUM_TRAIN_TIMESTEPS,
                      guidance=None if guidance is None else guidance.float(), pooled_projections=cond.pooled,
                      encoder_hidden_states=cond.prompt_embeds, txt_ids=txt_ids,
                      img_ids=_image_ids(h, w, x_t.device, dtype), return_dict=False)[0]
    return unpack_tokens(out, h, w)


class FlowSchedule:
    """The rectified-flow process of a flow teacher: x_t = (1 - sigma) x0 + sigma eps; the
    student's grid in sigmas. Mirrors distill.generator.NoiseSchedule's interface (`add_noise`,
    `to_x0`, `student_grid`, `num_train_timesteps`) with float sigmas in place of integer timesteps.

    Args:
        kind: SD3 or FLUX (d2g.teacher.flow).
    """

    num_train_timesteps = NUM_TRAIN_TIMESTEPS

    def __init__(self, kind: str):
        self.kind = kind

    @staticmethod
    def _col(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.float().to(like.device).view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t from clean latents, noise and per-sample sigmas (in x0's dtype)."""
        s = self._col(sigma, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def to_x0(self, velocity: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v (float32)."""
        return x_t.float() - self._col(sigma, x_t) * velocity.float()

    def student_grid(self, steps: int, trained_steps: int | None = None) -> list[float]:
        """The sigmas a student trained for `trained_steps` (default `steps`) samples at in `steps`:
        the trained grid is float32 linspace(1, 1/N, N) (FluxPipeline's sigma rule, what the stock
        scheduler holds when given it); fewer steps take the evenly spaced subset (index floor(i N /
        steps)), so a student only sees sigmas it was trained at. ValueError unless 1 <= steps <=
        trained_steps <= 4."""
        trained = steps if trained_steps is None else trained_steps
        if not 1 <= trained <= 4:
            raise ValueError(f"student steps must be in [1, 4], got {trained}")
        if not 1 <= steps <= trained:
            raise ValueError(f"student steps must be in [1, {trained}] for a student trained for {trained} "
                             f"step{'s' if trained > 1 else ''}, got {steps}")
        grid = [float(s) for s in np.linspace(1.0, 1.0 / trained, trained).astype(np.float32)]
        return [grid[(i * trained) // steps] for i in range(steps)]


def global_rng_draw(shape: tuple[int, ...], device: torch.device, generator=None) -> torch.Tensor:
    """Fresh noise as FlowMatchEulerDiscreteScheduler.step draws it inside a stock pipeline
    (randn_tensor, float32, no generator: torch's global RNG); `generator` (one, or one per
    sample) draws it instead, e.g. for previews that must not move the training RNG."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def packed_draw(shape: tuple[int, ...], device: torch.device, generator=None) -> torch.Tensor:
    """FLUX: the pipeline's latents are packed tokens, so its fresh noise is drawn in that shape;
    drawn the same way and unpacked here (a permutation)."""
    b, c, h, w = shape
    return unpack_tokens(global_rng_draw((b, (h // 2) * (w // 2), 4 * c), device, generator), h, w)


def flow_few_step_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                         grid: list[float], draw: Draw = global_rng_draw) -> torch.Tensor:
    """The flow student's sampler: x0 = x - s v(x, s) at each sigma s of `grid` (x = `noise` first),
    re-noised to the next sigma with fresh noise from `draw`, the last x0 returned (float32).
    As the stochastic FlowMatchEulerDiscreteScheduler step computes it, one draw per step (also
    after the last, where it is multiplied by sigma 0), so the stock pipeline's draws line up."""
    x = noise.float()
    x0 = x
    b = noise.shape[0]
    for i, s in enumerate(grid):
        sigma = torch.full((b,), s, dtype=torch.float32, device=noise.device)
        v = velocity(x, sigma).float()
        x0 = x - torch.tensor(s, dtype=torch.float32) * v
        nxt = torch.tensor(grid[i + 1] if i + 1 < len(grid) else 0.0, dtype=torch.float32)
        fresh = draw(tuple(x.shape), x.device)
        x = (1.0 - nxt) * x0 + nxt * fresh
    return x0


def sampler_draw(kind: str, generator=None) -> Draw:
    """The fresh-noise draw that matches kind's stock pipeline (FLUX: in its packed layout); with
    `generator` (one, or one per sample) drawn from it instead of torch's global RNG."""
    draw = packed_draw if kind == FLUX else global_rng_draw
    return lambda shape, device: draw(shape, device, generator)


class FlowGenerator(nn.Module):
    """Student G(x_t, sigma, c) -> x0: a trainable copy of the teacher transformer. One step from
    pure noise at sigma 1 by default.

    Args:
        teacher_transformer: the teacher's SD3Transformer2DModel / FluxTransformer2DModel; copied
            (float32, trainable), not modified.
        kind: SD3 or FLUX.
        gradient_checkpointing: recompute the copy's activations in backward.
    """

    def __init__(self, teacher_transformer: nn.Module, kind: str, gradient_checkpointing: bool = False):
        super().__init__()
        self.transformer = copy.deepcopy(teacher_transformer).float().train().requires_grad_(True)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.kind = kind
        self.schedule = FlowSchedule(kind)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor | None, cond: Conditioning) -> torch.Tensor:
        """Predict the clean latent from x_t at `sigma` [B] (None: sigma 1, x_t = noise)."""
        if sigma is None:
            sigma = torch.ones(x_t.shape[0], device=x_t.device)
        v = flow_velocity(self.transformer, self.kind, x_t, sigma, cond)
        return self.schedule.to_x0(v, x_t, sigma)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning, steps: int = 1, generator=None,
               trained_steps: int | None = None) -> torch.Tensor:
        """`steps`-step sampling of a student trained for `trained_steps` (default `steps`) from
        `noise`; the between-step noise comes from `generator` (one, or one per sample), or, when
        None, from torch's global RNG as in the stock pipeline."""
        grid = self.schedule.student_grid(steps, trained_steps)
        return flow_few_step_sample(lambda x, s: flow_velocity(self.transformer, self.kind, x, s, cond), noise,
                                    grid, sampler_draw(self.kind, generator))


def flow_student_scheduler(student_steps: int):
    """The stock FlowMatchEulerDiscreteScheduler that runs `flow_few_step_sample` for a student of
    `student_steps` inside a stock pipeline (FLOW_STUDENT_SCHEDULER_KWARGS, explicit kwargs only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not 1 <= student_steps <= 4:
        raise ValueError(f"student_steps must be 1 to 4, got {student_steps}")
    # StableDiffusion3Pipeline lets the scheduler build linspace(1, 1/1000, N); stretching it to end at
    # 1/N (an affine map of a linspace) gives exactly the student's linspace(1, 1/N, N). FluxPipeline
    # passes that grid itself, which the stretch leaves as it is.
    terminal = 1.0 / student_steps if student_steps > 1 else None
    return FlowMatchEulerDiscreteScheduler(**{**FLOW_STUDENT_SCHEDULER_KWARGS, "shift_terminal": terminal})


class FlowTextConditioner:
    """Builds `Conditioning` for a flow teacher's transformer: SD3's joint CLIP+T5 tokens and pooled
    CLIP projection, FLUX's T5 tokens and pooled CLIP (plus the guidance-embedding value), from
    stored `prompt_embeds` + `pooled_prompt_embeds` or by the pipeline's own `encode_prompt`.

    Args:
        pipe: the teacher pipeline.
        max_sequence_length: T5 tokens per prompt (None: the stock pipeline's default); must be the
            one the pairs were made with (pairgen records it in the fingerprint).
        guidance: FLUX's guidance-embedding value (ignored without a guidance embedding).
    """

    def __init__(self, pipe, max_sequence_length: int | None = None, guidance: float = FLUX_DEFAULT_GUIDANCE):
        self.pipe = pipe
        self.kind = teacher_kind(pipe)
        self.max_sequence_length = int(max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[self.kind])
        self.guidance = float(guidance)
        self.uses_guidance = self.kind == FLUX and bool(getattr(pipe.transformer.config, "guidance_embeds", False))

    @property
    def device(self) -> torch.device:
        """The transformer's device, where conditioning tensors are put."""
        return next(self.pipe.transformer.parameters()).device

    def __call__(self, batch: dict, latent_hw: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of `batch`; ConditioningError naming a missing or bad field."""
        size = len(batch[NOISE]) if NOISE in batch else len(batch[LATENT])
        if batch.get(PROMPT_EMBEDS) is not None:
            embeds, pooled = batch[PROMPT_EMBEDS], batch.get(POOLED_PROMPT_EMBEDS)
            if pooled is None:
                raise ConditioningError("batch has 'prompt_embeds' without 'pooled_prompt_embeds' (a "
                                        f"{type(self.pipe).__name__} teacher needs both)")
            if embeds.shape[0] != size or pooled.shape[0] != size:
                raise ConditioningError(f"batch fields 'prompt_embeds'/'pooled_prompt_embeds' have "
                                        f"{embeds.shape[0]}/{pooled.shape[0]} rows for {size} samples")
            cond = Conditioning(embeds.to(self.device), pooled.to(self.device))
        else:
            cond = self.encode(batch_prompts(batch, size))
        if self.uses_guidance:
            cond.guidance = torch.full((size,), self.guidance, device=self.device, dtype=torch.float32)
        return cond

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The teacher pipeline's own prompt encoding (no CFG)."""
        if self.kind == FLUX:
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
            return Conditioning(embeds, pooled)
        out = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                      max_sequence_length=self.max_sequence_length)
        return Conditioning(out[0], out[2])


def pairs_max_sequence_length(data_url: str | None) -> int | None:
    """The T5 token count the pairs of store `data_url` were encoded with (pairgen's fingerprint
    `solver.max_sequence_length`); None when unknown."""
    if data_url is None:
        return None
    from store import PairStore, parse_url

    try:
        fingerprint = PairStore(parse_url(data_url)[0]).read_fingerprint() or {}
    except FileNotFoundError:
        return None
    value = (fingerprint.get("solver") or {}).get("max_sequence_length")
    return None if value is None else int(value)
