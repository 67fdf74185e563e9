"""Training objectives for one-step students, selectable by name, combinable through config weights.

- `regression`: a regression loss (by name, from `distill.losses`) between G(z, c) and the teacher's
  ODE latent.
- `d2g` (Diffusion2GAN): E-LatentLPIPS regression + lambda_gan * non-saturating GAN loss with the
  teacher-UNet discriminator (z conditioning, multi-scale input, readout heads, single-sample lazy
  R1, mix-and-match; each switchable).
- `add` (ADD, latent form as in LADD): hinge GAN loss with frozen-teacher features and trainable
  heads (R1 on the heads' inputs) + lambda_sd * score distillation (the frozen teacher denoises the
  re-noised student output; the student regresses to it with stop-gradient).
Any term can be added to any objective by setting its weight (e.g. `add` with
`regression_weight=1`), so ablations are config changes.

API for the trainer (see `Objective`):
    obj = make_objective("d2g", teacher_pipe, ObjectiveConfig(...))
    obj.generator, obj.discriminator            # trainable modules (discriminator may be None)
    g_loss, logs = obj.generator_loss(batch, step)
    d_loss, logs = obj.discriminator_loss(batch, step)
The trainer may replace `obj.generator` / `obj.discriminator` by DDP wrappers: generator_loss runs
the generator through the attribute (so DDP syncs it) and the discriminator unwrapped with its
parameters frozen (requires_grad False, left so until the next discriminator_loss call, so a
checkpointed D recomputes identically in backward); discriminator_loss unfreezes the
discriminator, runs it through the attribute, and the generator unwrapped under no_grad.
Call backward on each loss before calling the other loss function.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn import functional as F

from distill.conditioning import Conditioning, TextConditioner
from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.d2g import HEAD_POINTS, D2GDiscriminator
from distill.discriminators.r1 import r1_penalty
from distill.discriminators.unet_probe import downsampling_factor
from distill.generator import OneStepGenerator

OBJECTIVES = ("add", "d2g", "regression")


class ObjectiveError(ValueError):
    """An objective that cannot be built for this teacher or config."""


class BatchShapeError(ValueError):
    """A batch field whose shape does not fit the teacher; the message names the field and both shapes."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf. The trainer should stop and keep the last good checkpoint."""

    def __init__(self, term: str, step: int, value: float):
        self.term, self.step, self.value = term, step, value
        super().__init__(f"loss term {term!r} is {value} at step {step}; stopping (last good checkpoint is kept)")


class ObjectiveConfig(BaseModel):
    """Every switch of every objective. `None` means "the named objective's preset" (see PRESETS)."""

    model_config = ConfigDict(extra="forbid")

    # term weights
    regression_weight: float | None = Field(None, ge=0)
    lambda_gan: float | None = Field(None, ge=0, description="adversarial weight (d2g: unpublished; add: 1)")
    lambda_sd: float | None = Field(None, ge=0, description="score-distillation weight (ADD: 2.5)")
    # regression
    regression_loss: str | None = None  # d2g: e_latent_lpips, regression: mse
    regression_kwargs: dict = Field(default_factory=dict)
    # GAN
    gan_loss: Literal["non_saturating", "hinge"] | None = None  # d2g: non_saturating, add: hinge
    r1_gamma: float | None = Field(None, ge=0)  # 0 disables; add: 1e-5 (paper), d2g: 1.0 (ours)
    r1_every: int = Field(16, ge=1, description="lazy R1: every k discriminator steps, scaled by k")
    r1_samples: int = Field(1, ge=1, description="d2g single-sample R1: how many real samples")
    mix_and_match: float | None = Field(None, ge=0, le=1, description="fraction of fakes replaced by mismatched reals")
    head_hidden: int = Field(64, ge=1)
    # Diffusion2GAN discriminator
    d2g_z_conditioning: bool = True
    d2g_multiscale: bool = True
    d2g_readout_heads: bool = True
    d2g_head_points: tuple[str, ...] = HEAD_POINTS
    d2g_timestep: int = Field(0, ge=0, description="timestep the D2G discriminator UNet is evaluated at")
    # ADD / LADD
    add_feature_blocks: list[str] | None = None  # None: every down block and the mid block
    add_t_logit_mean: float = 1.0  # discriminator re-noising t ~ LogitNormal(mean, std), as LADD
    add_t_logit_std: float = Field(1.0, gt=0)
    # c(t) of the score-distillation loss: "exponential" is ADD's alpha_t (its ablation setting);
    # ADD's final model used NFSD, which is not implemented (see docs/RESULTS.md).
    sd_weighting: Literal["exponential", "constant"] = "exponential"
    sd_guidance_scale: float = Field(1.0, ge=1.0)
    sd_t_min: int = Field(20, ge=0)
    sd_t_max: int = Field(980, ge=0)
    student_steps: int = Field(1, ge=1, le=4)
    student_step_probs: list[float] | None = None  # None: LADD's [0.7, 0.1, 0.1, 0.1], cut to student_steps
    # memory / precision
    gradient_checkpointing: bool = False
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 elsewhere

    @field_validator("d2g_head_points")
    @classmethod
    def _points(cls, value):
        bad = [p for p in value if p not in HEAD_POINTS]
        if bad:
            raise ValueError(f"unknown d2g head points {bad}; choose from {HEAD_POINTS}")
        return value


PRESETS: dict[str, dict] = {
    "regression": dict(regression_weight=1.0, lambda_gan=0.0, lambda_sd=0.0, regression_loss="mse",
                       gan_loss="non_saturating", r1_gamma=0.0, mix_and_match=0.0),
    "d2g": dict(regression_weight=1.0, lambda_gan=0.1, lambda_sd=0.0, regression_loss="e_latent_lpips",
                gan_loss="non_saturating", r1_gamma=1.0, mix_and_match=0.25),
    "add": dict(regression_weight=0.0, lambda_gan=1.0, lambda_sd=2.5, regression_loss="mse",
                gan_loss="hinge", r1_gamma=1e-5, mix_and_match=0.0),
}
DISCRIMINATOR_KIND = {"regression": None, "d2g": "d2g", "add": "add"}
FROZEN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_config(name: str, config: ObjectiveConfig) -> ObjectiveConfig:
    """Fill every `None` field from the objective's preset."""
    filled = {k: v for k, v in PRESETS[name].items() if getattr(config, k) is None}
    return config.model_copy(update=filled)


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
    """One objective: the student, an optional discriminator, and the two losses."""

    def __init__(self, name: str, pipe, config: ObjectiveConfig):
        self.name = name
        self.config = config = resolve_config(name, config)
        unet = getattr(pipe, "unet", None)
        if unet is None or not all(hasattr(unet, a) for a in ("conv_in", "down_blocks", "up_blocks")):
            raise ObjectiveError(
                f"objective {name!r} needs a UNet-based diffusers pipeline (student and discriminators are "
                f"built from the teacher UNet); teacher {type(pipe).__name__} has "
                f"{'a transformer denoiser' if hasattr(pipe, 'transformer') else 'no UNet'}"
            )
        if config.sd_t_min > config.sd_t_max:
            raise ObjectiveError(f"sd_t_min ({config.sd_t_min}) > sd_t_max ({config.sd_t_max})")
        self.pipe = pipe
        self.teacher_unet = unet.requires_grad_(False).eval()
        self.conditioner = TextConditioner(pipe)
        # Copies first (float32, trainable), then the frozen teacher may drop to half precision.
        self.generator: nn.Module = OneStepGenerator(unet, pipe.scheduler, config.gradient_checkpointing)
        self.schedule = self.generator.schedule
        kind = DISCRIMINATOR_KIND[name]
        self.discriminator: nn.Module | None = None
        if kind == "d2g":
            self.discriminator = D2GDiscriminator(
                unet, z_conditioning=config.d2g_z_conditioning, multiscale=config.d2g_multiscale,
                readout_heads=config.d2g_readout_heads, head_points=config.d2g_head_points,
                timestep=config.d2g_timestep, head_hidden=config.head_hidden,
                gradient_checkpointing=config.gradient_checkpointing,
            )
        self._cast_frozen_teacher()
        if kind == "add":
            try:
                self.discriminator = ADDDiscriminator(unet, config.add_feature_blocks, config.head_hidden)
            except ValueError as err:
                raise ObjectiveError(f"objective 'add': add_feature_blocks: {err}") from err
            self.discriminator.to(next(self.generator.parameters()).device)
        self.regression = None
        if config.regression_weight > 0:
            from distill.losses import make_regression_loss

            self.regression = make_regression_loss(config.regression_loss, **config.regression_kwargs)
            self.regression.to(next(self.generator.parameters()).device)
        self.step_probs = self._student_step_probs()

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

    def _student_step_probs(self) -> torch.Tensor:
        n = self.config.student_steps
        probs = self.config.student_step_probs or [0.7, 0.1, 0.1, 0.1][:n]
        if len(probs) != n or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ObjectiveError(f"student_step_probs {probs} must be {n} non-negative numbers (student_steps={n})")
        probs = torch.tensor(probs, dtype=torch.float64)
        return probs / probs.sum()

    @property
    def device(self) -> torch.device:
        return next(_unwrap(self.generator).parameters()).device

    # -- batch handling --------------------------------------------------------------------------
    def _validate(self, batch: dict) -> None:
        unet = self.teacher_unet
        channels, factor = unet.config.in_channels, downsampling_factor(unet)
        ref = None
        for field in ("noise", "latent"):
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
        noise = batch["noise"].to(self.device, torch.float32)
        latent = batch["latent"].to(self.device, torch.float32)
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

    def _disc_timesteps(self, b: int) -> torch.Tensor:
        """t ~ LogitNormal(mean, std) on [0, 1] mapped to discrete timesteps (LADD)."""
        c = self.config
        u = torch.sigmoid(torch.randn(b, device=self.device) * c.add_t_logit_std + c.add_t_logit_mean)
        return (u * (self.schedule.num_train_timesteps - 1)).round().long()

    # -- loss terms ------------------------------------------------------------------------------
    def _gan_g(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.gan_loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()

    def _gan_d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.gan_loss == "hinge":
            return F.relu(1 - real).mean(), F.relu(1 + fake).mean()
        return F.softplus(-real).mean(), F.softplus(fake).mean()

    def _add_features(self, disc: ADDDiscriminator, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor):
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        return disc.extract(x_t, t, cond)

    def _score_distillation(self, fake: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = self.config
        b = fake.shape[0]
        t = torch.randint(c.sd_t_min, c.sd_t_max + 1, (b,), device=fake.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(fake.detach(), torch.randn_like(fake), t)
            target = self._teacher_x0(x_t, t, cond)
        if c.sd_weighting == "exponential":
            weight = self.schedule.coefficients(t, fake)[0].flatten()  # alpha_t
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
            if isinstance(disc, D2GDiscriminator):
                logits = disc(fake, cond, z=x_in)
            else:
                t_d = self._disc_timesteps(fake.shape[0])
                logits = disc(self._add_features(disc, fake, cond, t_d), t_d, cond.summary_vector())
            terms["gan"] = c.lambda_gan * self._gan_g(logits)
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
        if self.discriminator is None:
            raise ObjectiveError(f"objective {self.name!r} has no discriminator (check obj.discriminator first)")
        c = self.config
        noise, latent, cond = self._prepare(batch)
        with torch.no_grad():
            x_in, t_in = self._student_input(noise, latent)
            fake = _unwrap(self.generator)(x_in, t_in, cond).float()
        fake = self._mix_and_match(fake, latent)
        b = latent.shape[0]
        r1_on = c.r1_gamma > 0 and step % c.r1_every == 0
        disc = _unwrap(self.discriminator)
        _set_trainable(disc, True)
        terms: dict[str, torch.Tensor] = {}
        if isinstance(disc, D2GDiscriminator):
            logits = self.discriminator(torch.cat([latent, fake]), cond.cat(cond), z=torch.cat([x_in, x_in]))
            real_logits, fake_logits = logits[:b], logits[b:]
            if r1_on:
                n = min(c.r1_samples, b)
                x = latent[:n].detach().requires_grad_(True)
                with disc.double_backward_safe():
                    r1_logits = self.discriminator(x, cond.select(slice(0, n)), z=x_in[:n])
                    penalty = r1_penalty(r1_logits.mean(dim=1), x).mean()
                terms["r1"] = 0.5 * c.r1_gamma * c.r1_every * penalty
        else:
            t_d = self._disc_timesteps(b)
            with torch.no_grad():
                real_feats = self._add_features(disc, latent, cond, t_d)
                fake_feats = self._add_features(disc, fake, cond, t_d)
            if r1_on:
                real_feats = [f.detach().requires_grad_(True) for f in real_feats]
            feats = [torch.cat([r, f]) for r, f in zip(real_feats, fake_feats, strict=True)]
            text = cond.summary_vector()
            logits = self.discriminator(feats, torch.cat([t_d, t_d]), torch.cat([text, text]))
            real_logits, fake_logits = logits[:b], logits[b:]
            if r1_on:
                # R1 on each head's input (LADD); features are leaves, so no backward into the teacher.
                terms["r1"] = 0.5 * c.r1_gamma * c.r1_every * r1_penalty(real_logits.mean(dim=1), real_feats).mean()
        terms["real"], terms["fake"] = self._gan_d(real_logits, fake_logits)
        for term, value in terms.items():
            _check_finite(f"discriminator/{term}", value, step)
        total = sum(terms.values())
        logs = {f"d/{k}": float(v.detach()) for k, v in terms.items()}
        logs.update({"d/total": float(total.detach()), "d/logit_real": float(real_logits.detach().mean()),
                     "d/logit_fake": float(fake_logits.detach().mean())})
        return total, logs

    @torch.no_grad()
    def sample(self, batch: dict, steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Student latents for a batch with 'noise' and 'prompt' or 'prompt_embeds' (evaluation)."""
        noise = batch["noise"].to(self.device, torch.float32)
        if noise.ndim != 4 or noise.shape[1] != self.teacher_unet.config.in_channels:
            raise BatchShapeError(
                f"batch field 'noise' has shape {tuple(noise.shape)}; the teacher UNet expects "
                f"[B, {self.teacher_unet.config.in_channels}, H, W]"
            )
        cond = self.conditioner(batch, tuple(noise.shape[-2:]))
        return _unwrap(self.generator).sample(noise, cond, steps or self.config.student_steps, generator)


def make_objective(name: str, teacher_pipe, config: ObjectiveConfig | dict | None = None) -> Objective:
    """Build an objective by name ('add', 'd2g', 'regression') for a loaded teacher pipeline."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}")
    if config is None:
        config = ObjectiveConfig()
    elif isinstance(config, dict):
        config = ObjectiveConfig(**config)
    return Objective(name, teacher_pipe, config)


__all__ = [
    "OBJECTIVES", "PRESETS", "BatchShapeError", "NonFiniteLossError", "Objective", "ObjectiveConfig",
    "ObjectiveError", "make_objective", "resolve_config",
]
