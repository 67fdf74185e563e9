"""Tiny diffusers teachers built from configs and saved with `save_pretrained`.

Tests load them back with `from_pretrained(path)`, the same code path as a real SD1.5 / SDXL
checkpoint, with HF_HUB_OFFLINE=1. Weights are random; shapes and plumbing are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2g.teacher.clip_vocab import write_clip_tokenizer

# Scheduler kwargs pinned explicitly: from_config carries unknown kwargs between classes.
SD_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    base = dict(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
    )
    base.update(overrides)
    return CLIPTextConfig(**base)


def _tokenizer_and_ids(folder: Path):
    tok = write_clip_tokenizer(folder, words=["a", "red", "blue", "green", "circle", "square", "cat"])
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               vocab_size=len(tok))
    return tok, ids


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16,
    )


def build_sd15(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """An SD1.5-architecture pipeline (about 0.3M parameters); 16x16 images, 4x8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tok, ids = _tokenizer_and_ids(path / "tokenizer")
    text_encoder = CLIPTextModel(_text_config(**ids))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_KWARGS, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_sdxl(path: str | Path, seed: int = 0) -> Path:
    """An SDXL-architecture pipeline: two text encoders, pooled embeddings, added time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok, ids = _tokenizer_and_ids(path / "tokenizer")
    tok2, ids2 = _tokenizer_and_ids(path / "tokenizer_2")
    text_encoder = CLIPTextModel(_text_config(**ids))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=16, **ids2))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=16 + 6 * 4, cross_attention_dim=32 + 32, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type="epsilon", timestep_spacing="leading", use_karras_sigmas=False,
        interpolation_type="linear",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
        tokenizer_2=tok2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path)
    return path
