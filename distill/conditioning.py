"""Text conditioning for the student, the discriminators and the frozen teacher, in one place.

A batch either carries stored text embeddings (`prompt_embeds`, and for SDXL-type UNets
`pooled_prompt_embeds`: the fields pairgen writes with store_prompt_embeds) or only the prompts;
then the teacher's own `encode_prompt` runs (frozen, no grad), so the embeddings match what the
teacher's pipeline would have used when it made the pairs. SDXL's size/crop time ids are not
stored: they are derived from the latent size as the pipeline derives them by default, which is
how pairgen's solver called it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from store import LATENT, NOISE, POOLED_PROMPT_EMBEDS, PROMPT, PROMPT_EMBEDS


class ConditioningError(ValueError):
    """A batch whose text conditioning cannot be built; the message names the field."""


@dataclass
class Conditioning:
    """Everything a diffusers UNet2DConditionModel needs besides the sample and the timestep: the
    text encoder's `prompt_embeds`, and for SDXL-type UNets the `pooled` embedding and `time_ids`.
    Flow transformers (distill.flow_student) use `prompt_embeds` and `pooled`, and FLUX with a
    guidance embedding its value per sample, `guidance` (kept float32 by `to`)."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, P] (SDXL-type UNets, SD3 and FLUX)
    time_ids: torch.Tensor | None = None  # [B, 6] (SDXL-type UNets only)
    guidance: torch.Tensor | None = None  # [B] (FLUX with a guidance embedding only)

    def unet_kwargs(self) -> dict:
        """Keyword arguments of a UNet2DConditionModel call for this conditioning."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def summary_vector(self) -> torch.Tensor:
        """One vector per sample for heads conditioned on text.

        SDXL-type teachers have a pooled embedding; SD1.5 has none, so we use the mean of the
        token embeddings (the EOS position is not recoverable from stored embeddings alone)."""
        if self.pooled is not None:
            return self.pooled
        return self.prompt_embeds.mean(dim=1)

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        """The conditioning of the samples `index` selects."""
        return Conditioning(
            self.prompt_embeds[index],
            None if self.pooled is None else self.pooled[index],
            None if self.time_ids is None else self.time_ids[index],
            None if self.guidance is None else self.guidance[index],
        )

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by `other`'s samples (in this conditioning's dtypes)."""
        def _cat(a, b):
            return None if a is None else torch.cat([a, b.to(a.dtype)], dim=0)

        return Conditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds], dim=0),
            _cat(self.pooled, other.pooled),
            _cat(self.time_ids, other.time_ids),
            _cat(self.guidance, other.guidance),
        )

    def to(self, dtype: torch.dtype) -> Conditioning:
        """Every tensor in `dtype`."""
        def _to(x):
            return None if x is None else x.to(dtype)

        return Conditioning(self.prompt_embeds.to(dtype), _to(self.pooled), _to(self.time_ids), self.guidance)


def needs_pooled(unet) -> bool:
    """SDXL-type UNets take pooled text embeddings and size/crop time ids."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def batch_prompts(batch: dict, size: int) -> list[str]:
    """The batch's 'prompt' field, checked against its `size` samples (ConditioningError if not)."""
    prompts = batch.get(PROMPT)
    if prompts is None:
        raise ConditioningError("batch has neither 'prompt_embeds' nor 'prompt'")
    if len(prompts) != size:
        raise ConditioningError(f"batch field 'prompt' has {len(prompts)} prompts for {size} samples")
    return list(prompts)


class TextConditioner:
    """Builds `Conditioning` for a batch from stored embeddings or by encoding prompts.

    Args:
        pipe: the teacher pipeline (its UNet decides SD1.5- or SDXL-type conditioning; its text
            encoders encode prompts).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.sdxl = needs_pooled(pipe.unet)
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self._negative: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        """The UNet's device, where conditioning tensors are put."""
        return next(self.unet.parameters()).device

    def __call__(self, batch: dict, latent_hw: tuple[int, int]) -> Conditioning:
        """The conditioning of `batch` ('prompt_embeds' [+ 'pooled_prompt_embeds'], else 'prompt')
        for latents of spatial size `latent_hw`; ConditioningError naming a missing or bad field."""
        size = len(batch[NOISE]) if NOISE in batch else len(batch[LATENT])
        if batch.get(PROMPT_EMBEDS) is not None:
            cond = self._from_stored(batch, size)
        else:
            cond = self.encode(batch_prompts(batch, size))
        if self.sdxl:
            cond.time_ids = self.time_ids(size, latent_hw, cond.prompt_embeds.dtype)
        return cond

    def _from_stored(self, batch: dict, size: int) -> Conditioning:
        embeds = batch[PROMPT_EMBEDS].to(self.device)
        if embeds.shape[0] != size:
            raise ConditioningError(f"batch field 'prompt_embeds' has {embeds.shape[0]} rows for {size} samples")
        pooled = batch.get(POOLED_PROMPT_EMBEDS)
        if self.sdxl and pooled is None:
            raise ConditioningError(
                "teacher UNet takes pooled text embeddings (SDXL-type) but the batch has 'prompt_embeds' "
                "without 'pooled_prompt_embeds'"
            )
        return Conditioning(embeds, pooled.to(self.device) if (self.sdxl and pooled is not None) else None)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The teacher pipeline's own prompt encoding (frozen text encoders, no CFG)."""
        if getattr(self.pipe, "text_encoder", None) is None and getattr(self.pipe, "text_encoder_2", None) is None:
            raise ConditioningError(
                "batch has no 'prompt_embeds' and the teacher has no text encoder to encode 'prompt'"
            )
        out = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if self.sdxl:
            return Conditioning(out[0], out[2])
        return Conditioning(out[0])

    def negative(self, size: int, latent_hw: tuple[int, int]) -> Conditioning:
        """Unconditional embeddings for classifier-free guidance, as the teacher pipeline makes them."""
        if self._negative is None:
            if self.sdxl and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
                pos = self.encode([""])
                neg = Conditioning(torch.zeros_like(pos.prompt_embeds), torch.zeros_like(pos.pooled))
            else:
                neg = self.encode([""])
            self._negative = neg
        neg = self._negative
        cond = Conditioning(
            neg.prompt_embeds.expand(size, -1, -1),
            None if neg.pooled is None else neg.pooled.expand(size, -1),
        )
        if self.sdxl:
            cond.time_ids = self.time_ids(size, latent_hw, cond.prompt_embeds.dtype)
        return cond

    def time_ids(self, size: int, latent_hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """SDXL micro-conditioning as the pipeline's default: original = target = image size, no crop."""
        h, w = (int(s) * self.vae_scale_factor for s in latent_hw)
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=self.device)
        return ids.expand(size, -1)
