"""The teacher VAE's map between pixels and diffusion latents, and the latent shape of a teacher.

One convention everywhere: images are float NCHW in [-1, 1] (what a VAE takes and a pipeline's
decoder returns); diffusion latents are `(posterior - shift_factor) * scaling_factor`, so SD1.5,
SDXL (no shift) and SD3/FLUX (with shift) latents all round-trip. `to_unit_range` maps images to
[0, 1] for PNGs and grids.
"""

from __future__ import annotations

import torch


def shift_and_scale(vae) -> tuple[float, float]:
    """The VAE's (shift_factor, scaling_factor); a missing or null shift is 0."""
    shift = getattr(vae.config, "shift_factor", None)
    scale = getattr(vae.config, "scaling_factor", None)
    return (0.0 if shift is None else float(shift)), (1.0 if scale is None else float(scale))


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> diffusion latents (the posterior's mode, shifted and scaled)."""
    shift, scale = shift_and_scale(vae)
    posterior = vae.encode(images.to(vae.dtype)).latent_dist.mode()
    return (posterior - shift) * scale


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images clamped to [-1, 1]. Differentiable (pixel-space losses use it);
    wrap in `torch.no_grad()` where no gradient is wanted."""
    shift, scale = shift_and_scale(vae)
    return vae.decode(latents.to(vae.dtype) / scale + shift).sample.clamp(-1, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], float32, for PNG files and preview grids."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(channels, latent height, latent width) of a pipeline's latents for an image of height x width
    pixels (default: the denoiser's native `sample_size`; FLUX, whose transformer has none: the
    pipeline's `default_sample_size`). For FLUX this is the unpacked [C, h, w] layout (the
    transformer takes 2x2 patches of it, packed). Raises ValueError when a size is not a multiple of
    the VAE's downsampling factor times the denoiser's patch size."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    factor = int(pipe.vae_scale_factor)
    channels = int(denoiser.config.in_channels)
    patch = int(getattr(denoiser.config, "patch_size", 1) or 1)
    native = getattr(denoiser.config, "sample_size", None)
    if hasattr(pipe, "_pack_latents"):  # FLUX-style: in_channels counts a packed 2x2 patch
        channels, patch, native = channels // 4, 2, getattr(pipe, "default_sample_size", 128)
    native = int(native) * factor
    height, width = height or native, width or native
    multiple = factor * patch
    if height % multiple or width % multiple:
        raise ValueError(f"height/width {height}x{width} must be multiples of {multiple} (the VAE factor {factor}"
                         + (f" times the patch size {patch})" if patch > 1 else ")"))
    return channels, height // factor, width // factor
