"""What an objective needs from a discriminator, whatever its kind.

An objective builds its discriminator with `from_config` and then only calls `generator_logits`
(the generator step) and `discriminator_logits` (the discriminator step). How each kind turns
latents into logits (a trainable UNet judging the latent itself, or heads on frozen teacher
features of a re-noised latent) and where it takes R1 stay inside the discriminator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import nn

from distill.conditioning import Conditioning
from distill.objective_config import AdversarialConfig


class DiscriminatorLogits(NamedTuple):
    """One discriminator step's outputs: logits [B, n_heads] (float32) of the real and the fake
    latents, and the per-sample R1 penalty [n] (the squared gradient norm of the real logits with
    respect to the discriminator's input) when it was asked for, else None."""

    real: torch.Tensor
    fake: torch.Tensor
    r1: torch.Tensor | None


class Discriminator(Protocol):
    """The discriminator interface of distill.objectives (D2GDiscriminator, ADDDiscriminator)."""

    @classmethod
    def from_config(cls, teacher_unet: nn.Module, schedule: nn.Module, config: AdversarialConfig) -> Discriminator:
        """Build from the teacher UNet, its noise schedule (distill.generator.NoiseSchedule) and
        the objective's config. Raises ValueError naming the bad option."""
        ...

    def generator_logits(self, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_heads] of the generator's latents `fake` for the generator step; gradients
        flow to `fake`. `z` is the generator's input for those latents."""
        ...

    def discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor,
                             r1: bool = False, forward: Callable | None = None) -> DiscriminatorLogits:
        """Logits of real and fake latents (same conditioning and generator input `z`) for the
        discriminator step, and the R1 penalty if `r1`. Trainable computation runs through
        `forward` (default: the discriminator itself; pass a DDP wrapper of it so the wrapper
        sees the call)."""
        ...
