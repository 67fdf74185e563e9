"""Shared measuring tools for the benchmarks: peak RSS per case in a fresh process, medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Stable Diffusion 1.5's VAE architecture (random weights are fine for cost measurements).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where unsupported (peaks are then upper bounds)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_worker(script: str, args: list[str], threads: int, mmap_threshold: int = 65536) -> dict:
    """Run `script --worker ...` in a fresh interpreter; its last stdout line is a JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if mmap_threshold > 0:
        # Large tensors mmapped and returned on free: RSS then follows live tensor memory.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# A small VAE for benchmarks whose cost is the UNet's (memory_bench): the step never decodes.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, layers_per_block=1, sample_size=64)


def build_sd15_pipeline(folder: Path, channels: list[int], layers_per_block: int = 1,
                        vae: dict | None = None) -> Path:
    """Save a StableDiffusionPipeline with an SD1.5-architecture UNet of block widths `channels`
    (random weights, a small CLIP text encoder, `vae` AutoencoderKL kwargs, default SD15_VAE)
    to `folder` and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from d2g.teacher.clip_vocab import write_clip_tokenizer

    torch.manual_seed(0)
    tok = write_clip_tokenizer(folder / "tokenizer", words="a red blue circle square".split())
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n = len(channels)
    unet = UNet2DConditionModel(block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                                sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=AutoencoderKL(**(vae or SD15_VAE)), text_encoder=text, tokenizer=tok, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder
