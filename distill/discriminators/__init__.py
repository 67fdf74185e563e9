"""Discriminators behind the interface objectives use (`Discriminator`: from_config,
generator_logits, discriminator_logits): Diffusion2GAN's (`d2g`) and ADD/LADD's (`add`) on the
teacher UNet, and ADD's published pixel-space one on a frozen vision backbone (`vision`)."""

from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.base import Discriminator, DiscriminatorLogits
from distill.discriminators.d2g import D2GDiscriminator
from distill.discriminators.r1 import r1_penalty
from distill.discriminators.vision import VisionDiscriminator

__all__ = ["ADDDiscriminator", "D2GDiscriminator", "Discriminator", "DiscriminatorLogits", "VisionDiscriminator",
           "r1_penalty"]
