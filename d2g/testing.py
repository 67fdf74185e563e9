"""Tiny diffusers teachers built from configs and saved with `save_pretrained`.

Tests load them back with `from_pretrained(path)`, the same code path as a real SD1.5 / SDXL / SD3 / FLUX
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


# -- flow-matching transformer teachers (SD3 and FLUX layouts) -------------------------------------
# The published VAE latent statistics of each family, so latents are shifted and scaled as in the real ones.
SD3_VAE_SHIFT_SCALE = (0.0609, 1.5305)
FLUX_VAE_SHIFT_SCALE = (0.1159, 0.3611)
_WORDS = ["a", "red", "blue", "green", "circle", "square", "cat"]


def _vae16(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16, norm_num_groups=8, layers_per_block=1, sample_size=32,
        shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def write_t5_tokenizer(folder: str | Path, words: list[str] | tuple[str, ...] = tuple(_WORDS), max_length: int = 512):
    """Save a T5 (Unigram) tokenizer with whole-word pieces for `words` plus single letters (so any
    lower-case text tokenizes), built in code, no sentencepiece model; return it loaded back."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    # T5's layout: <pad>=0, </s>=1, <unk>=2, then the pieces; whole words score above letters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_sd3(path: str | Path, seed: int = 0) -> Path:
    """An SD3-architecture pipeline (MMDiT transformer, two CLIP encoders with projections, a tiny T5,
    a 16-channel VAE with SD3's shift and scale); 32x32 images,
    16x16x16 latents in 2x2 patches. Scheduler: FlowMatchEulerDiscreteScheduler with shift 3 (SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok, ids = _tokenizer_and_ids(path / "tokenizer")
    tok2, ids2 = _tokenizer_and_ids(path / "tokenizer_2")
    text_encoder = CLIPTextModelWithProjection(_text_config(projection_dim=32, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32, **ids2))
    tok3 = write_t5_tokenizer(path / "tokenizer_3", max_length=256)
    text_encoder_3 = _t5_encoder(len(tok3), d_model=64)
    # joint_attention_dim = T5's width = the two CLIP widths side by side (the pipeline pads CLIP to it).
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        time_shift_type="exponential", stochastic_sampling=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae16(*SD3_VAE_SHIFT_SCALE),
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
        text_encoder_3=text_encoder_3, tokenizer_3=tok3,
    )
    pipe.save_pretrained(path)
    return path


def build_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A FLUX-architecture pipeline (double- and single-stream blocks, guidance embedding as in
    FLUX.1-dev, CLIP pooled + tiny T5 token embeddings, a 16-channel VAE with FLUX's shift and
    scale); 32x32 images, 16x16x16 latents packed into 8x8 tokens of 64 channels. Scheduler:
    FlowMatchEulerDiscreteScheduler with resolution-dependent (dynamic) shifting, as FLUX.1-dev's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tok, ids = _tokenizer_and_ids(path / "tokenizer")
    text_encoder = CLIPTextModel(_text_config(**ids))
    tok2 = write_t5_tokenizer(path / "tokenizer_2", max_length=512)
    text_encoder_2 = _t5_encoder(len(tok2), d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        time_shift_type="exponential", stochastic_sampling=False,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae16(*FLUX_VAE_SHIFT_SCALE), text_encoder=text_encoder, tokenizer=tok,
        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path
