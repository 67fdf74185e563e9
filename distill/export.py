"""Export a trained student as a stock diffusers pipeline folder, and generate with it.

The folder is the teacher's pipeline (VAE, text encoders, tokenizers) with the student's UNet and
a DDIM scheduler set so that `num_inference_steps=1` reproduces the student exactly: trailing
spacing evaluates t=T-1, and set_alpha_to_one=True makes the single DDIM step return the
predicted clean latent. Load it with `DiffusionPipeline.from_pretrained(DIR)` and call it with
`num_inference_steps=1, guidance_scale=0`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher
from d2g.teacher.schedulers import solver_kwargs
from distill.checkpoint import CheckpointError, CheckpointStore
from distill.train_config import TrainConfig

STUDENT_INFO = "d2g_student.json"


def one_step_scheduler(teacher_scheduler_config: dict):
    from diffusers import DDIMScheduler

    kwargs = solver_kwargs("ddim", dict(teacher_scheduler_config), "trailing")
    kwargs["set_alpha_to_one"] = True  # the last step lands on alpha=1: output = predicted x0
    return DDIMScheduler(**kwargs)


def _student_unet_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "unet."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError("checkpoint generator weights have no 'unet.' entries")
    return weights


def export_student(run_url: str, out_dir: str, step: int | None = None, use_ema: bool = True) -> Path:
    checkpoints = CheckpointStore(run_url)
    step = step if step is not None else checkpoints.latest()
    if step is None:
        raise CheckpointError(f"{run_url} has no complete checkpoint to export")
    weights, _, state = checkpoints.load(step, ["generator", "ema"])
    config = TrainConfig(**state["config"])
    source = "ema" if use_ema and "ema" in weights else "generator"
    pipe = load_teacher(config.teacher, device="cpu")
    pipe.unet.load_state_dict(_student_unet_weights(weights[source]))
    pipe.scheduler = one_step_scheduler(dict(pipe.scheduler.config))
    out = Path(out_dir)
    pipe.save_pretrained(out)
    info = {"run": run_url, "step": step, "weights": source, "teacher": config.teacher,
            "objective": config.objective, "num_inference_steps": 1, "guidance_scale": 0.0,
            "student_steps": config.objective_config.get("student_steps", 1)}
    (out / STUDENT_INFO).write_text(json.dumps(info, indent=2))
    return out


def load_student(model_dir: str):
    """The exported pipeline, frozen, progress bars off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def student_latents(pipe, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """Prompt to latent in one UNet evaluation, with d2g's own generator code (not the pipeline)."""
    from distill.conditioning import TextConditioner
    from distill.generator import NoiseSchedule

    cond = TextConditioner(pipe)({"prompt": prompts, "noise": noise}, tuple(noise.shape[-2:]))
    schedule = NoiseSchedule(pipe.scheduler)
    t = torch.full((noise.shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long)
    pred = pipe.unet(noise, t, **cond.unet_kwargs()).sample
    return schedule.to_x0(pred, noise, t)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], [B, 3, H, W]."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def save_pngs(images: torch.Tensor, folder: str, stem: str = "image") -> list[str]:
    from PIL import Image

    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        path = str(Path(folder) / f"{stem}-{i:03d}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
