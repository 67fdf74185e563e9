"""The options of each training objective, typed: one pydantic model per objective.

`ObjectiveConfig` holds what every objective has (regression and score-distillation terms, few-step
students, memory and precision); `AdversarialConfig` adds the GAN options of the objectives with a
discriminator; `RegressionConfig`, `D2GConfig`, `ADDConfig` and `LADDConfig` are the objectives
themselves, and their defaults are the objectives' presets (ADD and LADD as published, in the
latent form: see their docstrings). A config is parsed once, from YAML, `--objective-config`
JSON or a checkpoint's saved config, by `parse_objective_config` (which `TrainConfig` calls), and
then travels typed; errors name the field.

This module imports no torch, so reading and checking a training config stays light.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ObjectiveName = Literal["add", "d2g", "ladd", "regression"]
OBJECTIVES: tuple[str, ...] = typing.get_args(ObjectiveName)
HeadPoint = Literal["before", "skip", "after"]
HEAD_POINTS: tuple[str, ...] = typing.get_args(HeadPoint)
# LADD's probabilities of starting a few-step student's training step at each grid timestep
# (ADD samples its student's steps uniformly).
LADD_STEP_PROBS = (0.7, 0.1, 0.1, 0.1)
# The negative prompt of NFSD (Katzir et al., "Noise-Free Score Distillation", ICLR 2024,
# arXiv 2310.17590): its domain direction at large t is eps(x_t; "") - eps(x_t; this prompt).
NFSD_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                        "low-resolution, gloomy")


# LatentLPIPS weights shipped with the package, by name: `weights="shapes"` is the one for the
# embedded shapes teachers' VAE (trained by d2g/shapes/lpips_data.py's recipe, docs/RESULTS.md).
PACKAGED_LPIPS = {"shapes": Path(__file__).parent / "lpips" / "weights" / "shapes.safetensors"}
# Pixel LPIPS weights shipped with the package (`pixel_lpips` with `weights="shapes"`): a VGG16-BN trunk
# over the shapes VAE's decoded images, trained and calibrated by the same recipe (docs/RESULTS.md), the
# stand-in for ImageNet VGG16 + LPIPS heads, which this package cannot ship.
PACKAGED_PIXEL_LPIPS = {"shapes": Path(__file__).parent / "lpips" / "weights" / "shapes-pixel.safetensors"}
# A pixel metric judges decoded images, whatever the latent space: every shapes teacher can use it.
PACKAGED_PIXEL_LPIPS_FOR_TEACHER = {"shapes": "shapes", "shapes-xl": "shapes", "shapes-sd3": "shapes"}
# Teachers whose latent space has packaged LatentLPIPS weights (the shapes teachers share one VAE).
PACKAGED_LPIPS_FOR_TEACHER = {"shapes": "shapes", "shapes-xl": "shapes"}
LATENT_LPIPS_LOSSES = ("latent_lpips", "e_latent_lpips")
# The attention projections of every transformer block: the usual LoRA targets of a diffusers UNet.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Objectives whose discriminator is a trainable UNet copy, the only kind a LoRA can replace (add
# and ladd judge frozen teacher features with small heads; regression has no discriminator).
LORA_DISCRIMINATOR_OBJECTIVES = ("d2g",)


@dataclass(frozen=True)
class LoRASettings:
    """A LoRA adapter.

    Args:
        rank: the adapter's rank.
        alpha: its alpha (the update is scaled by alpha / rank).
        targets: names of the modules it wraps, matched as peft matches them (a module whose name
            ends with one of them).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS


@dataclass(frozen=True)
class MemoryOptions:
    """How the trainable UNets are held. distill.train_config.TrainConfig.memory() builds it from
    the `distill train` options.

    Args:
        generator_lora: the student as a LoRA adapter on the teacher UNet (None: a full copy).
        discriminator_lora: the d2g discriminator's UNet as a LoRA adapter (None: a full copy); with
            both, the teacher, generator and discriminator share one frozen base UNet (distill.lora).
        checkpoint_generator: gradient checkpointing of the student's UNet calls.
        checkpoint_discriminator: gradient checkpointing of the discriminator's UNet calls.
    """

    generator_lora: LoRASettings | None = None
    discriminator_lora: LoRASettings | None = None
    checkpoint_generator: bool = False
    checkpoint_discriminator: bool = False

    @property
    def uses_lora(self) -> bool:
        """Whether any adapter lives on the teacher's UNet."""
        return self.generator_lora is not None or self.discriminator_lora is not None


class ObjectiveConfig(BaseModel):
    """Options every objective has. Use an objective's own class (`OBJECTIVE_CONFIGS[name]`);
    this base only gathers the shared fields and checks."""

    model_config = ConfigDict(extra="forbid")
    objective: ClassVar[str] = ""

    regression_weight: float = Field(1.0, ge=0, description="weight of the regression term (0: off)")
    regression_loss: str = Field("mse", description="regression loss by name (distill.losses.REGRESSION_LOSSES)")
    regression_kwargs: dict = Field(default_factory=dict, description="options of the regression loss")
    lambda_sd: float = Field(0.0, ge=0, description="weight of the score-distillation term (ADD: 2.5)")
    # "exponential" is ADD's c(t) = alpha_t (its ablation setting); "nfsd" is the noise-free score
    # distillation ADD's final model used (distill.objectives.Objective._score_distillation).
    sd_weighting: Literal["exponential", "constant", "nfsd"] = Field(
        "exponential", description="score distillation: c(t) = alpha_t (exponential), 1 (constant), or NFSD")
    sd_guidance_scale: float | None = Field(
        None, ge=1.0, description="teacher guidance of the score-distillation target (None: the guidance the "
        "pairs were made with, read from the pair store's fingerprint when the objective is built; 1 if unknown)")
    sd_t_min: int = Field(20, ge=0, description="smallest score-distillation timestep")
    sd_t_max: int = Field(980, ge=0, description="largest score-distillation timestep")
    nfsd_negative_prompt: str = Field(NFSD_NEGATIVE_PROMPT, description="NFSD's negative prompt (sd_weighting nfsd)")
    nfsd_t_split: int = Field(200, ge=0, description="NFSD: below this t the domain direction is the unconditional "
                              "prediction, from it on the unconditional minus the negative prompt's")
    student_steps: int = Field(1, ge=1, le=4, description="sampling steps of the student (ADD: up to 4)")
    student_step_probs: list[float] | None = Field(
        None, description="per-grid-step training probabilities (None: the objective's default, uniform for "
        "add and regression, LADD's 0.7, 0.1, 0.1, 0.1 cut to student_steps for ladd)")
    flux_guidance: float = Field(3.5, ge=0, description="FLUX teachers with a guidance embedding: the guidance "
                                 "value the student runs at (FluxPipeline's default guidance_scale, so the exported "
                                 "pipeline's default call uses it)")
    gradient_checkpointing: bool = Field(False, description="recompute activations of trainable UNets in backward "
                                         "(the same as distill train --grad-checkpointing both)")
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype of the frozen teacher UNet (auto: fp16 on CUDA, fp32 elsewhere)")

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveConfig:
        if self.sd_t_min > self.sd_t_max:
            raise ValueError(f"sd_t_min ({self.sd_t_min}) > sd_t_max ({self.sd_t_max})")
        probs, n = self.step_probs(), self.student_steps
        if len(probs) != n or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(f"student_step_probs {probs} must be {n} non-negative numbers (student_steps={n})")
        return self

    def step_probs(self) -> list[float]:
        """The (unnormalised) probability of each grid step of a few-step student's training input:
        `student_step_probs`, else uniform (ADD samples its student's steps uniformly)."""
        return list(self.student_step_probs or [1.0] * self.student_steps)


class AdversarialConfig(ObjectiveConfig):
    """Options of the objectives with a discriminator: the GAN term, its loss, R1 and mix-and-match.
    Each field is redeclared by the objective classes with the objective's preset as default."""

    lambda_gan: float = Field(ge=0, description="weight of the adversarial term")
    gan_loss: Literal["non_saturating", "hinge"] = Field(description="GAN loss of both players")
    r1_gamma: float = Field(ge=0, description="R1 weight (0: off)")
    r1_every: int = Field(16, ge=1, description="lazy R1: every k discriminator steps, scaled by k")
    mix_and_match: float = Field(ge=0, le=1, description="fraction of fakes replaced by mismatched reals")
    head_hidden: int = Field(64, ge=1, description="hidden width of the discriminator heads")


class RegressionConfig(ObjectiveConfig):
    """`regression`: the student regresses to the teacher's ODE latents; defaults: MSE, weight 1.
    The fields are those of ObjectiveConfig."""

    objective: ClassVar[str] = "regression"


class D2GConfig(AdversarialConfig):
    """`d2g` (Diffusion2GAN): E-LatentLPIPS regression plus a non-saturating GAN with the
    teacher-UNet discriminator; each part of the discriminator is a switch (the paper's ablation)."""

    objective: ClassVar[str] = "d2g"

    regression_loss: str = Field("e_latent_lpips", description="regression loss by name")
    lambda_gan: float = Field(0.1, ge=0, description="weight of the adversarial term (unpublished in the paper)")
    gan_loss: Literal["non_saturating", "hinge"] = "non_saturating"
    r1_gamma: float = Field(1.0, ge=0, description="R1 weight (0: off)")
    mix_and_match: float = Field(0.25, ge=0, le=1, description="fraction of fakes replaced by mismatched reals")
    r1_samples: int = Field(1, ge=1, description="single-sample R1: how many real samples")
    d2g_z_conditioning: bool = Field(True, description="the generator's input noise conditions the discriminator")
    d2g_multiscale: bool = Field(True, description="the judged latent, resized, enters every down block")
    d2g_readout_heads: bool = Field(True, description="heads at every decoder scale (else one on the output)")
    d2g_head_points: tuple[HeadPoint, ...] = Field(HEAD_POINTS, description="where readout heads tap each scale")
    d2g_timestep: int = Field(0, ge=0, description="timestep the discriminator UNet is evaluated at")
    d2g_token_blocks: list[str] | None = Field(
        None, description="SD3/FLUX teachers: blocks whose image tokens readout heads read ('block0'.. of "
        "transformer_blocks, FLUX's 'single0'..; None: every block)")

    @model_validator(mode="after")
    def _one_step(self) -> D2GConfig:
        # A d2g student regresses the ODE's end point from pure noise; for a few-step student the
        # intermediate inputs would have to come from the teacher's trajectory, or the
        # discriminator's noise condition becomes the re-noised target itself (the real sample).
        if self.student_steps != 1:
            raise ValueError(f"student_steps={self.student_steps}: d2g trains one-step students (few-step d2g "
                             "needs the teacher's trajectory as targets, issue #17); use add or regression for "
                             "a few-step student")
        return self


class ADDFamilyConfig(AdversarialConfig):
    """Options of the ADD-family objectives (`add`, `ladd`): hinge GAN on frozen teacher features
    with trainable heads, R1 (gamma 1e-5) on the heads' inputs, re-noising for the discriminator.
    Use ADDConfig or LADDConfig."""

    regression_weight: float = Field(0.0, ge=0, description="weight of the regression term (0: off)")
    lambda_sd: float = Field(2.5, ge=0, description="weight of the score-distillation term")
    lambda_gan: float = Field(1.0, ge=0, description="weight of the adversarial term")
    gan_loss: Literal["non_saturating", "hinge"] = "hinge"
    r1_gamma: float = Field(1e-5, ge=0, description="R1 weight (0: off)")
    mix_and_match: float = Field(0.0, ge=0, le=1, description="fraction of fakes replaced by mismatched reals")
    add_feature_blocks: list[str] | None = Field(
        None, description="teacher blocks whose features the heads judge (None: every down block and mid; SD3/FLUX "
        "teachers: 'block0'.., FLUX's 'single0'..; None: every block)")
    add_t_logit_mean: float = Field(1.0, description="re-noising t ~ LogitNormal(mean, std), as LADD")
    add_t_logit_std: float = Field(1.0, gt=0, description="re-noising t ~ LogitNormal(mean, std), as LADD")
    student_steps: int = Field(4, ge=1, le=4, description="sampling steps of the student (ADD, LADD: 4)")
    # "vision" is ADD's published discriminator (distill.discriminators.vision); it decodes latents
    # with the teacher VAE every step, which nothing else in training does, hence off by default.
    add_discriminator: Literal["teacher", "vision"] = Field(
        "teacher", description="what the heads judge: frozen teacher-UNet features of re-noised latents (teacher, "
        "LADD's) or a frozen vision backbone's features of decoded images (vision, ADD's; decodes every step)")
    add_vision_backbone: str | None = Field(
        None, description="add_discriminator vision: a local folder of a transformers vision model with hidden "
        "states (ViTModel, Dinov2Model, CLIPVisionModel...), loaded with AutoModel.from_pretrained, frozen")
    add_vision_layers: list[int] | None = Field(
        None, description="add_discriminator vision: hidden-state indices the heads read (0: the embeddings, i: "
        "block i; None: 4 evenly spaced blocks ending with the last)")
    add_vision_size: int | None = Field(
        None, ge=1, description="add_discriminator vision: side decoded images are resized to (None: the "
        "backbone config's image_size)")

    @model_validator(mode="after")
    def _vision_options(self) -> ADDFamilyConfig:
        if self.add_discriminator == "vision":
            if not self.add_vision_backbone:
                raise ValueError("add_vision_backbone: add_discriminator 'vision' needs the local folder of a "
                                 "transformers vision model (e.g. a saved Dinov2Model)")
            if self.add_vision_layers is not None and (not self.add_vision_layers
                                                       or any(i < 0 for i in self.add_vision_layers)):
                raise ValueError(f"add_vision_layers: {self.add_vision_layers} must be non-empty hidden-state "
                                 "indices >= 0")
            return self
        unused = [k for k in ("add_vision_backbone", "add_vision_layers", "add_vision_size")
                  if getattr(self, k) is not None]
        if unused:
            raise ValueError(f"{unused[0]}: only used with add_discriminator 'vision' (it is "
                             f"{self.add_discriminator!r})")
        return self


class ADDConfig(ADDFamilyConfig):
    """`add`: ADD (Sauer et al. 2023) as published, in the latent form: a 4-step student whose
    training step starts at one of its 4 grid timesteps chosen uniformly, hinge GAN + lambda_sd 2.5
    score distillation towards the frozen teacher at the pairs' guidance (sd_guidance_scale None),
    c(t) = alpha_t (ADD's ablation setting; `sd_weighting: nfsd` is its final model's).

    The discriminator, by default, is not ADD's: it is the teacher's own features on re-noised
    latents (LADD's), and its heads see no image embedding. `add_discriminator: vision` with
    `add_vision_backbone` (a saved DINOv2, as ADD, or any transformers ViT) is ADD's: the latents are
    decoded by the teacher VAE and judged clean by heads on several layers of the frozen backbone,
    conditioned on the text and on the real image's pooled embedding (distill.discriminators.vision).
    Still not as published with it: the heads are ours (per-token FiLM + projection MLPs, not
    StyleGAN-T's conv blocks), and the backbone is whatever folder is given (no weights ship here)."""

    objective: ClassVar[str] = "add"


class LADDConfig(ADDFamilyConfig):
    """`ladd`: LADD (Sauer et al. 2024) as published: the frozen teacher is the discriminator's
    backbone (t ~ LogitNormal(1, 1) re-noising), a 4-step student whose training step starts at its
    grid timesteps with probabilities 0.7, 0.1, 0.1, 0.1, and, trained on teacher-made (synthetic)
    data, the adversarial loss alone (lambda_sd 0)."""

    objective: ClassVar[str] = "ladd"

    lambda_sd: float = Field(0.0, ge=0, description="weight of the score-distillation term (LADD on synthetic "
                             "data: 0)")

    def step_probs(self) -> list[float]:
        """`student_step_probs`, else LADD's 0.7, 0.1, 0.1, 0.1 cut to student_steps."""
        return list(self.student_step_probs or LADD_STEP_PROBS[: self.student_steps])


OBJECTIVE_CONFIGS: dict[str, type[ObjectiveConfig]] = {
    cls.objective: cls for cls in (ADDConfig, D2GConfig, LADDConfig, RegressionConfig)
}


def parse_objective_config(name: str, options: ObjectiveConfig | Mapping | None = None) -> ObjectiveConfig:
    """The typed config of objective `name` from a mapping of options (None: the preset).

    An instance of the objective's class is returned as it is; another objective's config carries
    over only the options that were set on it. Raises pydantic.ValidationError naming the field,
    ValueError for an unknown objective name."""
    if name not in OBJECTIVE_CONFIGS:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVE_CONFIGS[name]
    if type(options) is cls:  # exact: LADDConfig and ADDConfig share a base, not a class
        return options
    if isinstance(options, ObjectiveConfig):
        options = options.model_dump(exclude_unset=True)
    return cls.model_validate(dict(options or {}))


__all__ = [
    "ADDConfig", "ADDFamilyConfig", "AdversarialConfig", "D2GConfig", "HEAD_POINTS", "LADDConfig", "LoRASettings",
    "MemoryOptions", "OBJECTIVES",
    "OBJECTIVE_CONFIGS", "ObjectiveConfig", "RegressionConfig", "parse_objective_config",
]
