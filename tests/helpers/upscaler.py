"""A tiny random StableDiffusionUpscalePipeline (the x4 upscaler's architecture), built offline and saved."""

from __future__ import annotations

from pathlib import Path

import torch


def build_x4_upscaler(path: str | Path, seed: int = 0) -> Path:
    """The x4 upscaler's layout at toy size: a UNet taking 4 latent + 3 image channels (7) with a
    noise-level class embedding, a VAE that upsamples 4x (three blocks) with the upscaler's
    scaling factor, a 2-layer CLIP text encoder; pinned DDIM (v-prediction) and DDPM low-res schedulers."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from d2g.teacher.clip_vocab import write_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tok = write_clip_tokenizer(path / "tokenizer", words=["a", "red", "blue", "circle", "square", "cat"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, sample_size=32, scaling_factor=0.08333)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                              timestep_spacing="leading")
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                            clip_sample=False, prediction_type="epsilon", variance_type="fixed_small")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(path)
    return path
