"""What differs for flow-matching transformer teachers (SD3- and FLUX-style pipelines).

Which family a teacher is, how FLUX's packed token layout maps to the [C, h, w] latents we store
(the pipeline's own `_pack_latents` / `_unpack_latents`, a pure permutation), and the rules the
stock pipelines use for their sigma grid and the resolution-dependent shift mu, recorded in
pairgen's fingerprint.
"""

from __future__ import annotations

import torch

UNET, SD3, FLUX = "unet", "sd3", "flux"
FLOW_KINDS = (SD3, FLUX)

# How a stored [C, h, w] latent is laid out for the teacher's denoiser (recorded in the fingerprint).
LATENT_LAYOUTS = {
    SD3: "sd3-channels-first",  # [C, h, w] as the transformer takes it (it patchifies internally)
    FLUX: "flux-packed-2x2",  # stored unpacked; FluxPipeline._pack_latents makes [h/2*w/2, 4C] tokens
}
# The sigma grid each stock pipeline passes its scheduler, before shifting.
SIGMA_RULES = {
    SD3: "scheduler default: linspace(sigma_max, sigma_min, steps) of the scheduler's training grid",
    FLUX: "FluxPipeline: sigmas = linspace(1, 1/steps, steps)",
}
MU_RULE = ("mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_image_seq_len) / "
           "(max_image_seq_len - base_image_seq_len); image_seq_len = (h/2)*(w/2); used only when "
           "use_dynamic_shifting")
# The stock pipelines' default T5 token count (max_sequence_length).
DEFAULT_MAX_SEQUENCE_LENGTH = {SD3: 256, FLUX: 512}


class UnsupportedTeacher(ValueError):
    """A transformer pipeline that is neither SD3- nor FLUX-style."""


def kind_of_pipeline_class(class_name: str, has_unet: bool) -> str:
    """UNET, SD3 or FLUX from a pipeline's class name (model_index.json's `_class_name`)."""
    if has_unet:
        return UNET
    # The text-to-image pipelines only: FLUX's Fill/Control/Kontext variants take more inputs.
    if class_name == "StableDiffusion3Pipeline":
        return SD3
    if class_name == "FluxPipeline":
        return FLUX
    raise UnsupportedTeacher(f"teacher pipeline {class_name} is not supported: pairgen runs UNet (SD1.5/SDXL-style) "
                             "teachers, StableDiffusion3Pipeline and FluxPipeline")


def teacher_kind(pipe) -> str:
    """UNET, SD3 or FLUX for a loaded pipeline."""
    return kind_of_pipeline_class(type(pipe).__name__, getattr(pipe, "unet", None) is not None)


def kind_of_index(index: dict) -> str:
    """UNET, SD3 or FLUX from a teacher's model_index.json (no weights loaded). A pipeline without
    a transformer component counts as UNET (loading checks the rest)."""
    transformer = index.get("transformer")
    has_transformer = isinstance(transformer, list) and bool(transformer[0])
    class_name = str(index.get("_class_name", ""))
    if class_name in ("StableDiffusion3Pipeline", "FluxPipeline") or has_transformer:
        return kind_of_pipeline_class(class_name, has_unet=False)
    return UNET


def pack_tokens(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> FLUX's packed [B, h/2*w/2, 4C] tokens (each token a 2x2 patch, channel-major),
    for callers without a pipeline; equal to the pipeline's own packing (tested)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_tokens`: [B, h/2*w/2, 4C] -> [B, C, h, w] for an h x w latent."""
    b, _, packed = tokens.shape
    c = packed // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> FLUX's packed [B, h/2*w/2, 4C] tokens, by the pipeline's own packing."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def unpack(pipe, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX's packed tokens of a height x width image -> [B, C, h, w], by the pipeline's own unpacking."""
    return pipe._unpack_latents(tokens, height, width, pipe.vae_scale_factor)
