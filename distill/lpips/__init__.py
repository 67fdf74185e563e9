"""E-LatentLPIPS: a latent-space perceptual loss (trunk, heads, ensemble augmentations, checkpoints)."""

from .augment import DEFAULT_PRESET, PRESETS, LatentAugment
from .checkpoints import (
    CheckpointError,
    from_official,
    load_lpips,
    load_official_trunk,
    load_official_tuned,
    save_lpips,
    save_trunk,
)
from .latent_lpips import (
    LATENT_SPACES,
    VAE_LATENT_SCALINGS,
    ELatentLPIPS,
    LatentLPIPS,
    LatentSpace,
    latent_space,
    to_diffusion_latents,
)
from .trunk import LatentClassifier, LatentVGG16BN

__all__ = [
    "DEFAULT_PRESET",
    "LATENT_SPACES",
    "PRESETS",
    "VAE_LATENT_SCALINGS",
    "CheckpointError",
    "ELatentLPIPS",
    "LatentAugment",
    "LatentClassifier",
    "LatentLPIPS",
    "LatentSpace",
    "LatentVGG16BN",
    "from_official",
    "latent_space",
    "load_lpips",
    "load_official_trunk",
    "load_official_tuned",
    "save_lpips",
    "save_trunk",
    "to_diffusion_latents",
]
