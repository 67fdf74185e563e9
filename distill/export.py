"""Export a trained student as a stock diffusers pipeline folder, and generate with it.

The folder is the teacher's pipeline (VAE, text encoders, tokenizers) with the student's UNet and
a DDIM scheduler set so that `num_inference_steps=1` reproduces the student exactly: trailing
spacing evaluates t=T-1, and set_alpha_to_one=True makes the single DDIM step return the
predicted clean latent. Load it with `DiffusionPipeline.from_pretrained(DIR)` and call it with
`num_inference_steps=1, guidance_scale=0`. Images come from d2g.teacher.vae (`decode`, then
`to_unit_range` for PNGs), as for the teacher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher
from d2g.teacher.schedulers import solver_kwargs
from distill.checkpoint import CheckpointError, CheckpointStore
from distill.train_config import TrainConfig

STUDENT_INFO = "d2g_student.json"


def one_step_scheduler(teacher_scheduler_config: dict):
    """A DDIMScheduler with the teacher's schedule whose single step evaluates t=T-1 and returns
    the predicted clean latent (what the student was trained to output)."""
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
    """Write the student of run `run_url` (checkpoint `step`, default the latest; its EMA weights
    when `use_ema` and saved) as a diffusers pipeline folder `out_dir`, with STUDENT_INFO beside it.
    Returns the folder; CheckpointError if there is no such complete checkpoint."""
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
            "student_steps": config.objective_config.student_steps}
    (out / STUDENT_INFO).write_text(json.dumps(info, indent=2))
    return out


def load_student(model_dir: str, device: str = "cpu"):
    """The exported pipeline, loaded like a teacher (d2g.teacher.loading: frozen, progress bars
    off; TeacherError naming the folder if it is not a pipeline), on `device`."""
    # An absolute path: a local folder named like a built-in teacher alias ("shapes") must not
    # load that teacher instead.
    return load_teacher(os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir, device=device)


@torch.no_grad()
def student_latents(pipe, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """Prompt to latent in one UNet evaluation, with d2g's own generator code (not the pipeline):
    `prompts` (one per sample) and `noise` [B, C, h, w] to latents [B, C, h, w]."""
    from distill.conditioning import TextConditioner
    from distill.generator import NoiseSchedule

    cond = TextConditioner(pipe)({"prompt": prompts, "noise": noise}, tuple(noise.shape[-2:]))
    schedule = NoiseSchedule(pipe.scheduler)
    t = torch.full((noise.shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long)
    pred = pipe.unet(noise, t, **cond.unet_kwargs()).sample
    return schedule.to_x0(pred, noise, t)


def save_pngs(images: torch.Tensor, folder: str, stem: str = "image") -> list[str]:
    """Images [N, 3, H, W] in [0, 1] as FOLDER/STEM-000.png...; returns the paths."""
    from PIL import Image

    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        path = str(Path(folder) / f"{stem}-{i:03d}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
