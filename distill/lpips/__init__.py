"""E-LatentLPIPS: a latent-space perceptual loss (trunk, heads, ensemble augmentations, checkpoints)."""

from .augment import DEFAULT_PRESET, LatentAugment
from .checkpoints import (
    CheckpointError,
    from_official,
    load_lpips,
    load_official_trunk,
    load_official_tuned,
    save_lpips,
    save_trunk,
)
from .latent_lpips import VAE_LATENT_SCALINGS, ELatentLPIPS, LatentLPIPS, to_diffusion_latents
from .trunk import LatentClassifier, LatentVGG16BN

__all__ = [
    "DEFAULT_PRESET",
    "VAE_LATENT_SCALINGS",
    "CheckpointError",
    "ELatentLPIPS",
    "LatentAugment",
    "LatentClassifier",
    "LatentLPIPS",
    "LatentVGG16BN",
    "from_official",
    "load_lpips",
    "load_official_trunk",
    "load_official_tuned",
    "save_lpips",
    "save_trunk",
    "to_diffusion_latents",
]
