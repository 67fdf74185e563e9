"""Training objectives for one-step students, selectable by name, combinable through config weights.

- `regression`: a regression loss (by name, from `distill.losses`) between G(z, c) and the teacher's
  ODE latent.
- `d2g` (Diffusion2GAN): E-LatentLPIPS regression + lambda_gan * non-saturating GAN loss with the
  teacher-UNet discriminator (z conditioning, multi-scale input, readout heads, single-sample lazy
  R1, mix-and-match; each switchable).
- `add` (ADD, latent form as in LADD): hinge GAN loss with frozen-teacher features and trainable
  heads (R1 on the heads' inputs) + lambda_sd * score distillation (the frozen teacher, at the
  pairs' guidance, denoises the re-noised student output; the student regresses to it with
  stop-gradient); a 4-step student whose training steps start at its grid timesteps uniformly.
- `ladd` (LADD): the same discriminator, the adversarial loss alone (synthetic data), training
  steps started at the grid timesteps with probabilities 0.7, 0.1, 0.1, 0.1.
- `add_discriminator: vision` (either): ADD's published discriminator instead, heads on a frozen
  vision backbone judging VAE-decoded images (distill.discriminators.vision); the only training
  path that decodes latents, so off by default.
The regression and score-distillation terms can be added to any objective, and the adversarial
term's weight set for any objective with a discriminator (e.g. `add` with `regression_weight=1`),
so ablations are config changes.

Few-step students (student_steps > 1; not `d2g`, whose config refuses them): a training step
starts at one grid timestep per sample (`student_step_probs`): the first takes the pair's noise,
a later one the pair's latent re-noised to that timestep with fresh noise (ADD's scheme), and the
student predicts x0 from it. Sampling (`sample`, and the exported pipeline) runs
distill.generator.few_step_sample on the same grid.

Flow-matching transformer teachers (StableDiffusion3Pipeline, FluxPipeline): the student is
distill.flow_student.FlowGenerator (sigmas for timesteps), the discriminators those of
distill.discriminators.flow (FLOW_DISCRIMINATORS); score distillation and LoRA are refused for them.

API for the trainer (see `Objective`); each objective's options are a typed config
(distill.objective_config: RegressionConfig, D2GConfig, ADDConfig, LADDConfig; defaults are the presets):
    obj = make_objective("d2g", teacher_pipe, D2GConfig(lambda_gan=0.1), data=PAIRS_URL)
    obj.generator, obj.discriminator            # trainable modules (discriminator may be None)
    g_loss, logs = obj.generator_loss(batch, step)
    d_loss, logs = obj.discriminator_loss(batch, step)
The objective talks to its discriminator only through distill.discriminators.base.Discriminator.
The trainer may replace `obj.generator` / `obj.discriminator` by DDP wrappers (FSDP2 shards them in
place, no wrapper): generator_loss runs the generator through the attribute (so DDP syncs it) and
the discriminator unwrapped with its parameters frozen (requires_grad False, left so until the next
discriminator_loss call, so a checkpointed D recomputes identically in backward); discriminator_loss unfreezes the
discriminator, runs it through the attribute, and the generator unwrapped under no_grad.
Call backward on each loss before calling the other loss function.

Memory (`memory=MemoryOptions(...)`, from `distill train`'s --generator-lora-rank,
--discriminator-lora-rank and --grad-checkpointing): the student (any objective) and the d2g
discriminator's UNet (d2g only: add/ladd judge frozen teacher features, regression has no
discriminator) can be LoRA adapters on the teacher's own UNet instead of full copies; with both,
the teacher, student and discriminator share one frozen base (distill.lora). Full copies are made
before any adapter is injected, so a full copy never carries an adapter.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from d2g.teacher.flow import UnsupportedTeacher, teacher_kind
from distill.conditioning import Conditioning, TextConditioner
from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.d2g import D2GDiscriminator
from distill.discriminators.flow import FlowD2GDiscriminator, FlowLADDDiscriminator
from distill.discriminators.unet_probe import downsampling_factor
from distill.discriminators.vision import VisionDiscriminator
from distill.flow_student import (
    FlowGenerator,
    FlowTextConditioner,
    latent_channels,
    pairs_max_sequence_length,
    size_factor,
)
from distill.generator import NoiseSchedule, OneStepGenerator
from distill.objective_config import (
    LATENT_LPIPS_LOSSES,
    LORA_DISCRIMINATOR_OBJECTIVES,
    OBJECTIVE_CONFIGS,
    OBJECTIVES,
    ADDConfig,
    AdversarialConfig,
    D2GConfig,
    LADDConfig,
    MemoryOptions,
    ObjectiveConfig,
    RegressionConfig,
)
from store import LATENT, NOISE, PROMPT

# Which discriminator each objective trains (None: no adversarial term).
DISCRIMINATORS: dict[str, type[nn.Module] | None] = {"regression": None, "d2g": D2GDiscriminator,
                                                     "add": ADDDiscriminator, "ladd": ADDDiscriminator}
# Flow-matching transformer teachers (SD3/FLUX): the discriminator of each supported objective
# (None: no adversarial term); objectives not listed are refused for them.
FLOW_DISCRIMINATORS: dict[str, type[nn.Module] | None] = {"regression": None, "d2g": FlowD2GDiscriminator,
                                                          "add": FlowLADDDiscriminator, "ladd": FlowLADDDiscriminator}
FROZEN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger("distill")


class ObjectiveError(ValueError):
    """An objective that cannot be built for this teacher or config."""


class BatchShapeError(ValueError):
    """A batch field whose shape does not fit the teacher; the message names the field and both shapes."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf. The trainer should stop and keep the last good checkpoint.

    Args:
        term: the loss term, e.g. "generator/regression".
        step: the training step it happened at.
        value: the term's (non-finite) value.
    """

    def __init__(self, term: str, step: int, value: float):
        self.term, self.step, self.value = term, step, value
        super().__init__(f"loss term {term!r} is {value} at step {step}; stopping (last good checkpoint is kept)")


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    return getattr(module, "module", module)  # DDP / FSDP-style wrappers


def _set_trainable(module: nn.Module | None, flag: bool) -> None:
    """Phase switch for the discriminator. generator_loss turns its parameters off and leaves them
    off until the next discriminator_loss: the flags must stay unchanged until backward, because a
    gradient-checkpointed discriminator recomputes its forward during backward and must see the
    same requires_grad state (and the G step then builds no D parameter gradients at all)."""
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def _check_finite(term: str, value: torch.Tensor, step: int) -> None:
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteLossError(term, step, float(value.detach().float().sum()))


class Objective:
    """One objective: the student, an optional discriminator, and the two losses.

    Args:
        name: the objective, one of OBJECTIVES.
        pipe: the loaded, frozen teacher pipeline (a UNet-based diffusers pipeline, or a
            StableDiffusion3Pipeline / FluxPipeline).
        config: the objective's typed config (OBJECTIVE_CONFIGS[name]).
        memory: LoRA and gradient checkpointing of the trainable UNets (None: full copies, the
            config's gradient_checkpointing for both).
        max_sequence_length: SD3/FLUX teachers: T5 tokens per prompt when prompts are encoded (the
            pairs'; None: the stock pipeline's default). make_objective reads it from the pair store.
    """

    def __init__(self, name: str, pipe, config: ObjectiveConfig, memory: MemoryOptions | None = None,
                 max_sequence_length: int | None = None):
        self.name = name
        self.config = config
        self.flow_kind: str | None = None  # SD3 or FLUX for a flow-matching transformer teacher
        if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
            self._init_flow(pipe, memory or MemoryOptions(), max_sequence_length)
        else:
            self._init_unet(pipe, memory or MemoryOptions())
        self.regression = None
        if config.regression_weight > 0:
            from distill.losses import make_regression_loss

            kwargs = dict(config.regression_kwargs)
            if (self.flow_kind is not None and config.regression_loss in LATENT_LPIPS_LOSSES
                    and "vae" not in kwargs and "latent_channels" not in kwargs):
                kwargs["vae"] = pipe.vae  # the 16-channel latent space (shift, scale) from the teacher's VAE config
            if config.regression_loss == "pixel_lpips":
                kwargs.setdefault("vae", pipe.vae)  # it decodes with the teacher's own VAE
            self.regression = make_regression_loss(config.regression_loss, **kwargs)
            self.regression.to(self.device)
        probs = torch.tensor(config.step_probs(), dtype=torch.float64)
        self.step_probs = probs / probs.sum()
        self.grid = self.schedule.student_grid(config.student_steps)
        self._nfsd_negative: Conditioning | None = None
        if config.lambda_sd > 0 and config.sd_guidance_scale is None:
            # make_objective resolves it from the pair store (data=...); without a store, unguided.
            log.warning("objective %r: sd_guidance_scale is unset and no pair store was given to read the pairs' "
                        "guidance from; the score-distillation target is the unguided teacher (1.0)", name)

    def _init_flow(self, pipe, memory: MemoryOptions, max_sequence_length: int | None) -> None:
        """The student and discriminator of an SD3- or FLUX-style teacher (distill.flow_student);
        ObjectiveError naming the objective and the teacher class for what they do not support."""
        name, config, teacher = self.name, self.config, type(pipe).__name__
        try:
            self.flow_kind = teacher_kind(pipe)
        except UnsupportedTeacher:
            raise ObjectiveError(f"objective {name!r} needs a UNet-based, SD3- or FLUX-style diffusers pipeline; "
                                 f"teacher {teacher} has a transformer denoiser but is neither "
                                 "StableDiffusion3Pipeline nor FluxPipeline") from None
        if getattr(config, "add_discriminator", "teacher") == "vision":
            raise ObjectiveError(f"objective {name!r}: add_discriminator 'vision' is not supported for {teacher} "
                                 "teachers; use 'teacher'")
        if memory.uses_lora:
            raise ObjectiveError(f"objective {name!r}: LoRA students and discriminators are not supported for "
                                 f"{teacher} teachers (use full copies)")
        if config.lambda_sd > 0:
            raise ObjectiveError(f"objective {name!r}: score distillation (lambda_sd {config.lambda_sd}) is not "
                                 f"supported for {teacher} teachers; set lambda_sd 0")
        if name not in FLOW_DISCRIMINATORS:
            raise ObjectiveError(f"objective {name!r} is not supported for {teacher} teachers (supported: "
                                 f"{', '.join(FLOW_DISCRIMINATORS)})")
        kind = FLOW_DISCRIMINATORS[name]
        self.memory, self.pipe, self.shared = memory, pipe, None
        transformer = pipe.transformer
        self.teacher_unet = transformer.requires_grad_(False).eval()  # the frozen teacher denoiser
        self.latent_channels, self.size_factor = latent_channels(pipe), size_factor(pipe)
        self.conditioner = FlowTextConditioner(pipe, max_sequence_length, config.flux_guidance)
        self.generator = FlowGenerator(transformer, self.flow_kind,
                                       memory.checkpoint_generator or config.gradient_checkpointing)
        self.schedule = self.generator.schedule
        self.discriminator = None
        if kind is not None:
            checkpoint_d = memory.checkpoint_discriminator or config.gradient_checkpointing
            try:
                disc = kind.from_config(transformer, self.schedule, config, kind=self.flow_kind,
                                        gradient_checkpointing=checkpoint_d)
            except ValueError as err:
                raise ObjectiveError(f"objective {name!r}: {err}") from err
            self.discriminator = disc.to(next(transformer.parameters()).device)
        self._cast_frozen_teacher()

    def _init_unet(self, pipe, memory: MemoryOptions) -> None:
        """The student and discriminator of a UNet teacher (full copies or LoRA adapters)."""
        name, config = self.name, self.config
        unet = getattr(pipe, "unet", None)
        if unet is None or not all(hasattr(unet, a) for a in ("conv_in", "down_blocks", "up_blocks")):
            raise ObjectiveError(f"objective {name!r} needs a UNet-based, SD3- or FLUX-style diffusers pipeline; "
                                 f"teacher {type(pipe).__name__} has {'no UNet' if unet is None else type(unet).__name__}")
        self.latent_channels, self.size_factor = unet.config.in_channels, downsampling_factor(unet)
        kind = DISCRIMINATORS[name]
        if getattr(config, "add_discriminator", "teacher") == "vision":
            kind = VisionDiscriminator
        if memory.discriminator_lora is not None and name not in LORA_DISCRIMINATOR_OBJECTIVES:
            raise ObjectiveError(f"objective {name!r}: discriminator_lora_rank: no trainable discriminator UNet to "
                                 f"adapt (LoRA discriminators: {', '.join(LORA_DISCRIMINATOR_OBJECTIVES)})")
        self.memory = memory
        self.pipe = pipe
        self.teacher_unet = unet.requires_grad_(False).eval()
        self.conditioner = TextConditioner(pipe)
        checkpoint_g = memory.checkpoint_generator or config.gradient_checkpointing
        checkpoint_d = memory.checkpoint_discriminator or config.gradient_checkpointing
        # Full copies first (float32, trainable), then the frozen teacher may drop to half precision,
        # then adapters go onto it (float32).
        self.shared = None
        self.generator: nn.Module | None = None
        if memory.generator_lora is None:
            self.generator = OneStepGenerator(unet, pipe.scheduler, checkpoint_g)
            self.schedule = self.generator.schedule
        else:
            self.schedule = NoiseSchedule(pipe.scheduler)
        self.discriminator: nn.Module | None = None
        if kind is not None and memory.discriminator_lora is None:
            self.discriminator = self._build_discriminator(kind, unet, checkpoint_d)
        self._cast_frozen_teacher()
        if memory.uses_lora:
            from distill.lora import LoRAError, LoRAGenerator, SharedUNet

            self.shared = SharedUNet(unet)
            try:
                if memory.generator_lora is not None:
                    self.generator = LoRAGenerator(self.shared, pipe.scheduler, memory.generator_lora, checkpoint_g)
                    self.schedule = self.generator.schedule
                if memory.discriminator_lora is not None:
                    self.discriminator = self._build_discriminator(kind, unet, checkpoint_d, self.shared,
                                                                   memory.discriminator_lora)
            except LoRAError as err:
                raise ObjectiveError(f"objective {name!r}: {err}") from err

    @property
    def sd_guidance_scale(self) -> float:
        """The teacher guidance of the score-distillation target (1.0 when unset and unresolved)."""
        g = self.config.sd_guidance_scale
        return 1.0 if g is None else float(g)

    # -- setup helpers ---------------------------------------------------------------------------
    def _build_discriminator(self, kind, unet, checkpointing: bool, shared=None, lora=None) -> nn.Module:
        """The objective's discriminator on the teacher UNet (a full copy, or adapter "disc" on
        `shared`), on the student's device; ObjectiveError naming the bad option."""
        extra = {"gradient_checkpointing": checkpointing} if kind is D2GDiscriminator else {}
        if kind is VisionDiscriminator:
            extra["vae"] = self.pipe.vae
        if shared is not None:
            extra.update(shared=shared, lora=lora)
        try:
            disc = kind.from_config(unet, self.schedule, self.config, **extra)
        except ValueError as err:
            raise ObjectiveError(f"objective {self.name!r}: {err}") from err
        return disc.to(next(unet.parameters()).device)

    def _cast_frozen_teacher(self) -> None:
        choice = self.config.frozen_dtype
        device = next(self.teacher_unet.parameters()).device
        if choice == "auto":
            dtype = torch.float16 if device.type == "cuda" else None
        else:
            dtype = FROZEN_DTYPES[choice]
        if dtype is not None:
            self.teacher_unet.to(dtype)

    @property
    def device(self) -> torch.device:
        """The device of the student's parameters (where batches are moved)."""
        return next(_unwrap(self.generator).parameters()).device

    # -- batch handling --------------------------------------------------------------------------
    def _validate(self, batch: dict) -> None:
        channels, factor = self.latent_channels, self.size_factor
        ref = None
        for field in (NOISE, LATENT):
            x = batch.get(field)
            if x is None:
                raise BatchShapeError(f"batch has no {field!r} field (needed by objective {self.name!r})")
            if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
                raise BatchShapeError(
                    f"batch field {field!r} has shape {tuple(x.shape)}; the teacher expects "
                    f"[B, {channels}, H, W] with H and W multiples of {factor}"
                )
            if ref is not None and x.shape != ref[1].shape:
                raise BatchShapeError(
                    f"batch field {field!r} has shape {tuple(x.shape)} but {ref[0]!r} has {tuple(ref[1].shape)}"
                )
            ref = (field, x)

    def _prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        self._validate(batch)
        noise = batch[NOISE].to(self.device, torch.float32)
        latent = batch[LATENT].to(self.device, torch.float32)
        return noise, latent, self.conditioner(batch, tuple(latent.shape[-2:]))

    def _student_input(self, noise: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_in and its timesteps: pure noise at T-1, or (few-step students, as ADD) a grid timestep
        chosen per sample with `student_step_probs`: the pair's noise at the first, the target
        re-noised to it with fresh noise at a later one. The grid is the sampler's
        (NoiseSchedule.student_grid), so training sees the timesteps sampling will use."""
        grid = self.grid
        b = noise.shape[0]
        if len(grid) == 1:
            # UNet grids are integer timesteps, flow grids float sigmas.
            dtype = torch.long if isinstance(grid[0], int) else torch.float32
            return noise, torch.full((b,), grid[0], device=noise.device, dtype=dtype)
        idx = torch.multinomial(self.step_probs, b, replacement=True).to(noise.device)
        timesteps = torch.tensor(grid, device=noise.device)[idx]
        renoised = self.schedule.add_noise(latent, torch.randn_like(latent), timesteps)
        x_in = torch.where((idx == 0).view(-1, 1, 1, 1), noise, renoised)
        return x_in, timesteps

    # -- loss terms ------------------------------------------------------------------------------
    def _gan_g(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.gan_loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()

    def _gan_d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.gan_loss == "hinge":
            return F.relu(1 - real).mean(), F.relu(1 + fake).mean()
        return F.softplus(-real).mean(), F.softplus(fake).mean()

    def _score_distillation(self, fake: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ADD's distillation term: c(t) * d(x_theta, sg(target)), d the per-sample mean squared
        error, x_theta the student output re-noised to t ~ U[sd_t_min, sd_t_max] for the teacher."""
        c = self.config
        b = fake.shape[0]
        t = torch.randint(c.sd_t_min, c.sd_t_max + 1, (b,), device=fake.device)
        alpha, sigma = (v.flatten() for v in self.schedule.coefficients(t, fake))
        with torch.no_grad():
            eps = torch.randn_like(fake)
            x_t = self.schedule.add_noise(fake.detach(), eps, t)
            if c.sd_weighting == "nfsd":
                target = self._nfsd_target(fake.detach().float(), x_t, t, cond)
            else:
                target = self._teacher_x0(x_t, t, cond)
        if c.sd_weighting == "exponential":
            weight = alpha  # ADD's c(t) = alpha_t
        elif c.sd_weighting == "nfsd":
            # The x0-space form of NFSD's gradient w(t) (delta_D + s delta_C) (see _nfsd_target):
            # d/dx_theta of c(t) |x_theta - target|^2 is c(t) (sigma_t / alpha_t) (delta_D + s delta_C),
            # so c(t) = alpha_t sigma_t gives w(t) = sigma_t^2, DreamFusion's SDS weighting, which NFSD
            # keeps. (The c(t) ADD paired NFSD with is not in our notes; this is the NFSD paper's.)
            weight = alpha * sigma
        else:
            weight = torch.ones(b, device=fake.device)
        per_sample = ((fake.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        return (weight * per_sample).mean()

    def _teacher_x0s(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[Conditioning]) -> list[torch.Tensor]:
        """The frozen teacher's x0 predictions for `x_t` under each conditioning, in one batched call."""
        unet = self.teacher_unet
        dtype = next(unet.parameters()).dtype
        n = len(conds)
        both = conds[0]
        for other in conds[1:]:
            both = both.cat(other)
        xs, ts = torch.cat([x_t] * n), torch.cat([t] * n)
        pred = unet(xs.to(dtype), ts, **both.to(dtype).unet_kwargs()).sample
        return list(self.schedule.to_x0(pred, xs, ts).chunk(n))

    def _teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The score-distillation target: the teacher's x0, with classifier-free guidance at
        sd_guidance_scale when it is above 1."""
        g = self.sd_guidance_scale
        if g > 1:
            neg = self.conditioner.negative(x_t.shape[0], tuple(x_t.shape[-2:]))
            x0_u, x0_c = self._teacher_x0s(x_t, t, [neg, cond])
            return x0_u + g * (x0_c - x0_u)
        return self._teacher_x0s(x_t, t, [cond])[0]

    def _nfsd_target(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The NFSD target for student output `x0` re-noised to `x_t` at `t`.

        NFSD (Katzir et al., "Noise-Free Score Distillation", ICLR 2024, arXiv 2310.17590) replaces
        SDS's eps_cfg - eps by delta_D + s delta_C: delta_C = eps(x_t; y) - eps(x_t; "") the condition
        direction, s the guidance scale, and delta_D the domain direction, eps(x_t; "") for t <
        nfsd_t_split (200) and eps(x_t; "") - eps(x_t; negative prompt) above. As an x0 target
        (eps_a - eps_b = -(alpha/sigma)(x0_a - x0_b)): target = x0 - (sigma/alpha)(delta_D + s delta_C)
        = x0 - D + s (x0_c - x0_u), with D = x_t/alpha - x0_u below the split and x0_n - x0_u above.
        """
        c = self.config
        hw = tuple(x_t.shape[-2:])
        b = x_t.shape[0]
        uncond = self.conditioner.negative(b, hw)
        x0_u, x0_c, x0_n = self._teacher_x0s(x_t, t, [uncond, cond, self._negative_prompt(b, hw)])
        alpha = self.schedule.coefficients(t, x_t)[0]
        low = (t < c.nfsd_t_split).view(-1, 1, 1, 1)
        domain = torch.where(low, x_t.float() / alpha - x0_u, x0_n - x0_u)
        return x0 - domain + self.sd_guidance_scale * (x0_c - x0_u)

    def _negative_prompt(self, size: int, latent_hw: tuple[int, int]) -> Conditioning:
        """NFSD's negative-prompt conditioning for `size` samples (encoded once)."""
        if self._nfsd_negative is None:
            self._nfsd_negative = self.conditioner({PROMPT: [self.config.nfsd_negative_prompt], NOISE: [0]}, latent_hw)
        neg = self._nfsd_negative
        return Conditioning(neg.prompt_embeds.expand(size, -1, -1),
                            None if neg.pooled is None else neg.pooled.expand(size, -1),
                            None if neg.time_ids is None else neg.time_ids.expand(size, -1))

    def _mix_and_match(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Replace a fraction of fakes by real latents of other samples (wrong prompt/noise): fake."""
        k = int(round(self.config.mix_and_match * fake.shape[0]))
        if k == 0 or fake.shape[0] < 2:
            return fake
        return torch.cat([real.roll(1, dims=0)[:k], fake[k:]], dim=0)

    # -- public API ------------------------------------------------------------------------------
    def generator_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's weighted loss on a batch ('noise', 'latent', and 'prompt' or stored
        embeddings) and its terms as floats ('g/<term>', 'g/total'). `step` names the step in a
        NonFiniteLossError. Freezes the discriminator's parameters until discriminator_loss."""
        c = self.config
        noise, latent, cond = self._prepare(batch)
        x_in, t_in = self._student_input(noise, latent)
        fake = self.generator(x_in, t_in, cond)
        terms: dict[str, torch.Tensor] = {}
        if self.regression is not None:
            terms["regression"] = c.regression_weight * self.regression(fake, latent).float().mean()
        disc = _unwrap(self.discriminator)
        if disc is not None and c.lambda_gan > 0:
            _set_trainable(disc, False)
            # ADD's pixel discriminator conditions on the image embedding of the real the fake was made for.
            extra = {"real": latent} if isinstance(disc, VisionDiscriminator) else {}
            terms["gan"] = c.lambda_gan * self._gan_g(disc.generator_logits(fake, cond, x_in, **extra))
        if c.lambda_sd > 0:
            terms["score_distillation"] = c.lambda_sd * self._score_distillation(fake, cond)
        if not terms:
            raise ObjectiveError(f"objective {self.name!r}: every generator loss weight is 0")
        for term, value in terms.items():
            _check_finite(f"generator/{term}", value, step)
        total = sum(terms.values())
        logs = {f"g/{k}": float(v.detach()) for k, v in terms.items()}
        logs["g/total"] = float(total.detach())
        return total, logs

    def discriminator_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminator's GAN loss on a batch (fakes from the generator under no_grad, some
        replaced by mismatched reals), plus lazy R1 every `r1_every` steps (by `step`); logs
        'd/<term>', 'd/total' and the mean real/fake logits. Raises ObjectiveError without a
        discriminator."""
        if self.discriminator is None:
            raise ObjectiveError(f"objective {self.name!r} has no discriminator (check obj.discriminator first)")
        c = self.config
        noise, latent, cond = self._prepare(batch)
        with torch.no_grad():
            x_in, t_in = self._student_input(noise, latent)
            fake = _unwrap(self.generator)(x_in, t_in, cond).float()
        fake = self._mix_and_match(fake, latent)
        r1_on = c.r1_gamma > 0 and step % c.r1_every == 0
        disc = _unwrap(self.discriminator)
        _set_trainable(disc, True)
        out = disc.discriminator_logits(latent, fake, cond, x_in, r1=r1_on, forward=self.discriminator)
        terms: dict[str, torch.Tensor] = {}
        if out.r1 is not None:
            terms["r1"] = 0.5 * c.r1_gamma * c.r1_every * out.r1.mean()
        terms["real"], terms["fake"] = self._gan_d(out.real, out.fake)
        for term, value in terms.items():
            _check_finite(f"discriminator/{term}", value, step)
        total = sum(terms.values())
        logs = {f"d/{k}": float(v.detach()) for k, v in terms.items()}
        logs.update({"d/total": float(total.detach()), "d/logit_real": float(out.real.detach().mean()),
                     "d/logit_fake": float(out.fake.detach().mean())})
        return total, logs

    @torch.no_grad()
    def sample(self, batch: dict, steps: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Student latents for a batch with 'noise' and 'prompt' or 'prompt_embeds' (evaluation),
        in `steps` steps (default: the config's student_steps; fewer take a subset of its grid, see
        NoiseSchedule.student_grid); `generator` (one, or one per sample) draws the fresh noise
        between steps, as the exported pipeline's `generator` does."""
        noise = batch[NOISE].to(self.device, torch.float32)
        if noise.ndim != 4 or noise.shape[1] != self.latent_channels:
            raise BatchShapeError(
                f"batch field 'noise' has shape {tuple(noise.shape)}; the teacher expects "
                f"[B, {self.latent_channels}, H, W]"
            )
        cond = self.conditioner(batch, tuple(noise.shape[-2:]))
        trained = self.config.student_steps
        return _unwrap(self.generator).sample(noise, cond, steps or trained, generator, trained_steps=trained)


def pairs_guidance(data_url: str) -> float | None:
    """The classifier-free guidance the pairs of store `data_url` (URL[@vN]) were made with, from
    its fingerprint (pairgen records `solver.guidance`); None when the store has no fingerprint or
    it does not say. Guidance <= 1 means none: returned as 1.0."""
    from store import PairStore, parse_url

    fingerprint = PairStore(parse_url(data_url)[0]).read_fingerprint() or {}
    guidance = (fingerprint.get("solver") or {}).get("guidance")
    return None if guidance is None else max(1.0, float(guidance))


def resolve_objective_config(config: ObjectiveConfig, data: str | None) -> ObjectiveConfig:
    """`config` with what it leaves to the data filled in: an unset sd_guidance_scale becomes the
    guidance the pairs of `data` were made with (`pairs_guidance`), so score distillation pulls
    towards the same distribution as the pairs the discriminator sees. A copy; `config` itself
    (and the run's saved config) keeps None, which resolves the same way on resume because a store
    root holds one fingerprint."""
    if config.sd_guidance_scale is not None or config.lambda_sd == 0 or data is None:
        return config
    guidance = pairs_guidance(data)
    if guidance is None:
        return config
    return config.model_copy(update={"sd_guidance_scale": guidance})


def make_objective(name: str, teacher_pipe, config: ObjectiveConfig | None = None,
                   data: str | None = None, memory: MemoryOptions | None = None) -> Objective:
    """Build an objective by name ('add', 'd2g', 'ladd', 'regression') for a loaded teacher
    pipeline, with its typed config (None: the objective's preset). `data`, the pair store URL the
    run trains on, resolves what the config leaves to the data (`resolve_objective_config`: the
    score-distillation guidance); without it an unset guidance means unguided. Raises ValueError
    for an unknown name and ObjectiveError for a config of another objective or one this teacher
    cannot use. `memory`: LoRA adapters and gradient checkpointing (MemoryOptions; None: full
    copies)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}")
    expected = OBJECTIVE_CONFIGS[name]
    if config is None:
        config = expected()
    elif type(config) is not expected:  # exact: ADDConfig and LADDConfig share a base class
        raise ObjectiveError(f"objective {name!r} takes {expected.__name__}, got {type(config).__name__} "
                             "(see distill.objective_config.parse_objective_config)")
    flow = getattr(teacher_pipe, "unet", None) is None and getattr(teacher_pipe, "transformer", None) is not None
    return Objective(name, teacher_pipe, resolve_objective_config(config, data), memory,
                     max_sequence_length=pairs_max_sequence_length(data) if flow else None)


__all__ = [
    "OBJECTIVES", "OBJECTIVE_CONFIGS", "ADDConfig", "AdversarialConfig", "BatchShapeError", "D2GConfig",
    "LADDConfig", "MemoryOptions", "NonFiniteLossError", "Objective", "ObjectiveConfig", "ObjectiveError", "RegressionConfig",
    "make_objective", "pairs_guidance", "resolve_objective_config",
]
