"""Training objectives for one-step students, selectable by name, combinable through config weights.

- `regression`: a regression loss (by name, from `distill.losses`) between G(z, c) and the teacher's
  ODE latent.
- `d2g` (Diffusion2GAN): E-LatentLPIPS regression + lambda_gan * non-saturating GAN loss with the
  teacher-UNet discriminator (z conditioning, multi-scale input, readout heads, single-sample lazy
  R1, mix-and-match; each switchable).
- `add` (ADD, latent form as in LADD): hinge GAN loss with frozen-teacher features and trainable
  heads (R1 on the heads' inputs) + lambda_sd * score distillation (the frozen teacher denoises the
  re-noised student output; the student regresses to it with stop-gradient).
The regression and score-distillation terms can be added to any objective, and the adversarial
term's weight set for any objective with a discriminator (e.g. `add` with `regression_weight=1`),
so ablations are config changes.

API for the trainer (see `Objective`); each objective's options are a typed config
(distill.objective_config: RegressionConfig, D2GConfig, ADDConfig; defaults are the presets):
    obj = make_objective("d2g", teacher_pipe, D2GConfig(lambda_gan=0.1))
    obj.generator, obj.discriminator            # trainable modules (discriminator may be None)
    g_loss, logs = obj.generator_loss(batch, step)
    d_loss, logs = obj.discriminator_loss(batch, step)
The objective talks to its discriminator only through distill.discriminators.base.Discriminator.
The trainer may replace `obj.generator` / `obj.discriminator` by DDP wrappers: generator_loss runs
the generator through the attribute (so DDP syncs it) and the discriminator unwrapped with its
parameters frozen (requires_grad False, left so until the next discriminator_loss call, so a
checkpointed D recomputes identically in backward); discriminator_loss unfreezes the
discriminator, runs it through the attribute, and the generator unwrapped under no_grad.
Call backward on each loss before calling the other loss function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distill.conditioning import Conditioning, TextConditioner
from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.d2g import D2GDiscriminator
from distill.discriminators.unet_probe import downsampling_factor
from distill.generator import OneStepGenerator
from distill.objective_config import (
    OBJECTIVE_CONFIGS,
    OBJECTIVES,
    ADDConfig,
    AdversarialConfig,
    D2GConfig,
    ObjectiveConfig,
    RegressionConfig,
)
from store import LATENT, NOISE

# Which discriminator each objective trains (None: no adversarial term).
DISCRIMINATORS: dict[str, type[nn.Module] | None] = {"regression": None, "d2g": D2GDiscriminator,
                                                     "add": ADDDiscriminator}
FROZEN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        pipe: the loaded, frozen teacher pipeline (a UNet-based diffusers pipeline).
        config: the objective's typed config (OBJECTIVE_CONFIGS[name]).
    """

    def __init__(self, name: str, pipe, config: ObjectiveConfig):
        self.name = name
        self.config = config
        unet = getattr(pipe, "unet", None)
        if unet is None or not all(hasattr(unet, a) for a in ("conv_in", "down_blocks", "up_blocks")):
            raise ObjectiveError(
                f"objective {name!r} needs a UNet-based diffusers pipeline (student and discriminators are "
                f"built from the teacher UNet); teacher {type(pipe).__name__} has "
                f"{'a transformer denoiser' if hasattr(pipe, 'transformer') else 'no UNet'}"
            )
        self.pipe = pipe
        self.teacher_unet = unet.requires_grad_(False).eval()
        self.conditioner = TextConditioner(pipe)
        # Copies first (float32, trainable), then the frozen teacher may drop to half precision.
        self.generator: nn.Module = OneStepGenerator(unet, pipe.scheduler, config.gradient_checkpointing)
        self.schedule = self.generator.schedule
        self.discriminator: nn.Module | None = None
        kind = DISCRIMINATORS[name]
        if kind is not None:
            try:
                self.discriminator = kind.from_config(unet, self.schedule, config)
            except ValueError as err:
                raise ObjectiveError(f"objective {name!r}: {err}") from err
            self.discriminator.to(self.device)
        self._cast_frozen_teacher()
        self.regression = None
        if config.regression_weight > 0:
            from distill.losses import make_regression_loss

            self.regression = make_regression_loss(config.regression_loss, **config.regression_kwargs)
            self.regression.to(self.device)
        probs = torch.tensor(config.step_probs(), dtype=torch.float64)
        self.step_probs = probs / probs.sum()

    # -- setup helpers ---------------------------------------------------------------------------
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
        unet = self.teacher_unet
        channels, factor = unet.config.in_channels, downsampling_factor(unet)
        ref = None
        for field in (NOISE, LATENT):
            x = batch.get(field)
            if x is None:
                raise BatchShapeError(f"batch has no {field!r} field (needed by objective {self.name!r})")
            if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
                raise BatchShapeError(
                    f"batch field {field!r} has shape {tuple(x.shape)}; the teacher UNet expects "
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
        """x_in and its timesteps: pure noise at T-1, or (ADD few-step students) the target re-noised
        to a grid timestep with fresh noise, chosen per sample with `student_step_probs`."""
        grid = self.schedule.trailing_grid(self.config.student_steps)
        b = noise.shape[0]
        if len(grid) == 1:
            return noise, torch.full((b,), grid[0], device=noise.device, dtype=torch.long)
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
        c = self.config
        b = fake.shape[0]
        t = torch.randint(c.sd_t_min, c.sd_t_max + 1, (b,), device=fake.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(fake.detach(), torch.randn_like(fake), t)
            target = self._teacher_x0(x_t, t, cond)
        if c.sd_weighting == "exponential":
            weight = self.schedule.coefficients(t, fake)[0].flatten()  # ADD's c(t) = alpha_t
        else:
            weight = torch.ones(b, device=fake.device)
        per_sample = ((fake.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        return (weight * per_sample).mean()

    def _teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        unet = self.teacher_unet
        dtype = next(unet.parameters()).dtype
        g = self.config.sd_guidance_scale
        if g > 1:
            neg = self.conditioner.negative(x_t.shape[0], tuple(x_t.shape[-2:]))
            both = neg.cat(cond)
            pred = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), **both.to(dtype).unet_kwargs()).sample
            x0_u, x0_c = self.schedule.to_x0(pred, torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
            return x0_u + g * (x0_c - x0_u)
        pred = unet(x_t.to(dtype), t, **cond.to(dtype).unet_kwargs()).sample
        return self.schedule.to_x0(pred, x_t, t)

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
            terms["gan"] = c.lambda_gan * self._gan_g(disc.generator_logits(fake, cond, x_in))
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
    def sample(self, batch: dict, steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Student latents for a batch with 'noise' and 'prompt' or 'prompt_embeds' (evaluation),
        in `steps` steps (default: the config's student_steps); `generator` seeds the fresh noise
        between steps."""
        noise = batch[NOISE].to(self.device, torch.float32)
        if noise.ndim != 4 or noise.shape[1] != self.teacher_unet.config.in_channels:
            raise BatchShapeError(
                f"batch field 'noise' has shape {tuple(noise.shape)}; the teacher UNet expects "
                f"[B, {self.teacher_unet.config.in_channels}, H, W]"
            )
        cond = self.conditioner(batch, tuple(noise.shape[-2:]))
        return _unwrap(self.generator).sample(noise, cond, steps or self.config.student_steps, generator)


def make_objective(name: str, teacher_pipe, config: ObjectiveConfig | None = None) -> Objective:
    """Build an objective by name ('add', 'd2g', 'regression') for a loaded teacher pipeline, with
    its typed config (None: the objective's preset). Raises ValueError for an unknown name and
    ObjectiveError for a config of another objective or one this teacher cannot use."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}")
    expected = OBJECTIVE_CONFIGS[name]
    if config is None:
        config = expected()
    elif not isinstance(config, expected):
        raise ObjectiveError(f"objective {name!r} takes {expected.__name__}, got {type(config).__name__} "
                             "(see distill.objective_config.parse_objective_config)")
    return Objective(name, teacher_pipe, config)


__all__ = [
    "OBJECTIVES", "OBJECTIVE_CONFIGS", "ADDConfig", "AdversarialConfig", "BatchShapeError", "D2GConfig",
    "NonFiniteLossError", "Objective", "ObjectiveConfig", "ObjectiveError", "RegressionConfig", "make_objective",
]
