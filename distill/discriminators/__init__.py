"""Discriminators built on the teacher UNet: Diffusion2GAN (`d2g`) and ADD/LADD (`add`)."""

from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.d2g import D2GDiscriminator
from distill.discriminators.r1 import r1_penalty

__all__ = ["ADDDiscriminator", "D2GDiscriminator", "r1_penalty"]
