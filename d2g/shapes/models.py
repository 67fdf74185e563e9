"""Component configs of the shapes teachers (SD1.5, SDXL and SD3 layouts) and builders for each component.

Sizes follow the CPU trials recorded in issue 8: a (16, 32, 64) VAE giving 4x8x8 latents for
32x32 images, a ~1M-parameter UNet with cross-attention at both levels, and a small frozen random
CLIP text encoder (its random features are enough to tell the caption words apart).
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2g.shapes import world
from d2g.teacher.clip_vocab import write_clip_tokenizer

TOKEN_LENGTH = 32  # longest caption is ~20 tokens with BOS/EOS; SD's 77 would only cost attention time

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 64), sample_size=world.IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=TOKEN_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
)

# The SDXL-layout teacher ("shapes-xl") shares the VAE, the tokenizer and the first text encoder
# with the SD1.5-layout one. As in SDXL: a second encoder with a text projection (its pooled output
# conditions the UNet with the six size/crop time ids), penultimate hidden states of both encoders
# concatenated for cross-attention, and empty prompts replaced by zeros for guidance.
TEXT_CONFIG_2 = dict(TEXT_CONFIG, projection_dim=32)
XL_TIME_EMBED_DIM = 8
XL_UNET_CONFIG = dict(
    UNET_CONFIG, cross_attention_dim=2 * TEXT_CONFIG["hidden_size"], addition_embed_type="text_time",
    addition_time_embed_dim=XL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TEXT_CONFIG_2["projection_dim"] + 6 * XL_TIME_EMBED_DIM,
)
# The SD3-layout teacher ("shapes-sd3"): a flow-matching MMDiT on the same 4x8x8 latents (patch 2:
# 16 image tokens), the same VAE and tokenizer. StableDiffusion3Pipeline needs two CLIP encoders
# with projections (the first: the SD1.5-layout teacher's encoder plus a frozen random projection;
# the second: the SDXL-layout teacher's second encoder). Without T5 it puts `max_sequence_length`
# zero tokens after the CLIP ones, and the transformer trains on exactly that. A folder saved
# without T5 loads only with `from_pretrained(..., text_encoder_3=None, tokenizer_3=None)`, so the
# T5 slot holds a zero encoder instead (every weight 0, so its output is exactly those zeros; 90 kB):
# a plain `DiffusionPipeline.from_pretrained` loads the teacher, and dropping T5 changes nothing.
SD3_MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 token count, so a default call runs the teacher right
SD3_PROJECTION_DIM = TEXT_CONFIG_2["projection_dim"]
SD3_TRANSFORMER_CONFIG = dict(
    sample_size=UNET_CONFIG["sample_size"], patch_size=2, out_channels=None, num_layers=4, attention_head_dim=16,
    num_attention_heads=4, caption_projection_dim=64, joint_attention_dim=2 * TEXT_CONFIG["hidden_size"],
    pooled_projection_dim=2 * SD3_PROJECTION_DIM, pos_embed_max_size=UNET_CONFIG["sample_size"] // 2,
)
# Every FlowMatchEulerDiscreteScheduler kwarg pinned. shift 1: SD3's shift 3 is for 1024-px images
# (4096 tokens); at 16 tokens no shifting is the matching choice, and it is the one trained for.
FLOW_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
    stochastic_sampling=False,
)
LAYOUTS = ("sd", "sdxl", "sd3")

# SD1.5's training noise schedule.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Every DDIMScheduler kwarg that changes sampling is pinned, so no diffusers default can drift:
# - timestep_spacing="trailing": a 1-step sample evaluates t=999 (pure noise is treated as pure
#   noise); SD's "leading" would evaluate t=1 for one step.
# - steps_offset=1 is SD1.5's value; diffusers applies it only to "leading" spacing, so with
#   "trailing" it has no effect and is kept for a familiar config.
# - clip_sample=False, set_alpha_to_one=False, thresholding=False as in SD1.5.
DDIM_KWARGS = dict(
    **NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="trailing", thresholding=False, rescale_betas_zero_snr=False,
)


def token_safe_order(words: list[str]) -> list[str]:
    """Order `words` so write_clip_tokenizer makes each one a single token.

    BPE applies merges by rank, and write_clip_tokenizer ranks them in word order: a word whose
    inside contains an earlier word's first pair ("triangle" holds "ri" of "right") gets split.
    Moving the split words to the front gives their merge chains the better ranks."""
    import tempfile

    order = list(words)
    for _ in range(len(words)):
        with tempfile.TemporaryDirectory() as tmp:
            tok = write_clip_tokenizer(tmp, order, max_length=TOKEN_LENGTH)
            split = [w for w in order if len(tok(w).input_ids) != 3]  # BOS, word, EOS
        if not split:
            return order
        order = split + [w for w in order if w not in split]
    raise ValueError(f"cannot order the vocabulary so that every word is one token: {split}")


def build_tokenizer(folder: str | Path):
    """The project's CLIP tokenizer with every caption word as one token (saved to `folder`)."""
    return write_clip_tokenizer(folder, token_safe_order(world.vocabulary()), max_length=TOKEN_LENGTH)


def build_text_encoder(tokenizer, seed: int = 0):
    """The frozen random CLIP text encoder (TEXT_CONFIG) for `tokenizer`'s vocabulary, from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TEXT_CONFIG)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_text_encoder_2(tokenizer, seed: int = 1):
    """SDXL's second encoder: CLIP with a text projection, whose projected EOS state is the pooled embedding."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TEXT_CONFIG_2)
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def build_vae(seed: int = 0):
    """A fresh AutoencoderKL of VAE_CONFIG, initialised from `seed`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int = 0, layout: str = "sd"):
    """A fresh UNet2DConditionModel of `layout` ("sd" or "sdxl"), initialised from `seed`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(XL_UNET_CONFIG if layout == "sdxl" else UNET_CONFIG))


def build_transformer(seed: int = 0, latent_channels: int = VAE_CONFIG["latent_channels"]):
    """A fresh SD3Transformer2DModel of SD3_TRANSFORMER_CONFIG on `latent_channels`-channel latents
    (the VAE's), initialised from `seed`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(in_channels=latent_channels, **SD3_TRANSFORMER_CONFIG)


def with_projection(text_encoder, seed: int = 0):
    """`text_encoder` (a CLIPTextModel) as a CLIPTextModelWithProjection, which SD3's first text
    encoder must be: the same text model weights plus a frozen random projection (from `seed`) to
    SD3_PROJECTION_DIM, whose EOS output becomes half of the pooled embedding."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": SD3_PROJECTION_DIM})
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config)
    # CLIPTextModel's weights are its text model's (with or without a text_model. prefix, by
    # transformers version); strict, so every weight is reused.
    text_model = getattr(text_encoder, "text_model", text_encoder)
    model.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in text_model.state_dict().items()})
    return model.eval().requires_grad_(False)


def build_zero_t5(tokenizer_folder: str | Path, width: int = SD3_TRANSFORMER_CONFIG["joint_attention_dim"]):
    """(T5 tokenizer saved to `tokenizer_folder`, T5 encoder of `width` whose every weight is 0):
    its output is exactly zero for any prompt (its final RMS norm scales by 0), which is what
    StableDiffusion3Pipeline passes when it has no T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    from d2g.testing import write_t5_tokenizer

    tokenizer = write_t5_tokenizer(tokenizer_folder, world.vocabulary(), max_length=SD3_MAX_SEQUENCE_LENGTH)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
    return tokenizer, encoder.eval().requires_grad_(False)


def build_flow_scheduler():
    """The SD3-layout teacher's FlowMatchEulerDiscreteScheduler, every kwarg pinned (FLOW_SCHEDULER_KWARGS)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_KWARGS)


def assemble_sd3_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, text_encoder_3=None,
                          tokenizer_3=None):
    """A StableDiffusion3Pipeline of the components (both CLIP encoders with projections, sharing
    `tokenizer`; `text_encoder_3` the zero T5 of `build_zero_t5`, or None), with the pinned
    flow-matching scheduler. The VAE gets an explicit shift_factor 0.0 (the pipeline adds it when
    decoding; the shapes VAE has none)."""
    from diffusers import StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_flow_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


@torch.no_grad()
def encode_prompts_sd3(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP token embeddings [B, TOKEN_LENGTH, 128], pooled [B, 64]) through the SD3 pipeline's own
    encode_prompt: the joint embedding it passes is these tokens followed by max_sequence_length
    zeros (no T5, or the zero T5), so only the CLIP part is stored and the zeros are appended at
    training time.
    The empty prompt is encoded as text, as the pipeline encodes its negative prompt "" for guidance."""
    from diffusers.utils import logging as diffusers_logging

    # One T5 token is all we ask for: the pipeline's warning that it truncated every caption to it
    # (a screenful of them per batch) says nothing.
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  device=torch.device("cpu"), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, max_sequence_length=1)
    finally:
        diffusers_logging.set_verbosity(previous)
    if embeds[:, -1].abs().sum() != 0:
        raise ValueError("the SD3 pipeline's T5 tokens are not zeros; the shapes teacher is trained on zeros")
    return embeds[:, :-1], pooled


def build_scheduler():
    """The shapes teachers' DDIMScheduler, every sampling kwarg pinned (DDIM_KWARGS)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DDIM_KWARGS)


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear cumulative alphas (identical to the scheduler's), for training."""
    n = NOISE_SCHEDULE["num_train_timesteps"]
    betas = torch.linspace(NOISE_SCHEDULE["beta_start"] ** 0.5, NOISE_SCHEDULE["beta_end"] ** 0.5, n,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def assemble_pipeline(vae, text_encoder, tokenizer, unet, text_encoder_2=None):
    """A StableDiffusionPipeline of the components, with the pinned DDIM scheduler; a
    StableDiffusionXLPipeline when a second text encoder is given."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_untrained_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save a random-weight pipeline with the teacher's exact configs (tests the loading path)."""
    folder = Path(folder)
    tokenizer = build_tokenizer(folder / "tokenizer")
    pipe = assemble_pipeline(build_vae(seed), build_text_encoder(tokenizer, seed), tokenizer, build_unet(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@torch.no_grad()
def encode_prompts_xl(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) through the SDXL pipeline's own encode_prompt; the empty prompt gives
    zeros, as the pipeline's guidance uses with force_zeros_for_empty_prompt."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"),
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    empty = torch.tensor([p == "" for p in prompts])
    embeds[empty], pooled[empty] = 0.0, 0.0
    return embeds, pooled


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline computes them (max-length padding,
    last hidden state), so the UNet trains on what it will see at sampling time."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]
