"""Discriminators built on the teacher UNet: Diffusion2GAN (`d2g`) and ADD/LADD (`add`), both behind
the interface objectives use (`Discriminator`: from_config, generator_logits, discriminator_logits)."""

from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.base import Discriminator, DiscriminatorLogits
from distill.discriminators.d2g import D2GDiscriminator
from distill.discriminators.r1 import r1_penalty

__all__ = ["ADDDiscriminator", "D2GDiscriminator", "Discriminator", "DiscriminatorLogits", "r1_penalty"]
