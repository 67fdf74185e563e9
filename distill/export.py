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
import posixpath
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher
from d2g.teacher.schedulers import solver_kwargs
from distill.checkpoint import CheckpointError, CheckpointStore
from distill.train_config import TrainConfig
from store import NOISE, PROMPT

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


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
base_model: {base_model}
tags:
- d2g
- distillation
- {objective}
---

# One-step student of `{teacher}`

Distilled by d2g with the `{objective}` objective ({step} training steps, {weights} weights) from the
pair store `{data}` (fingerprint xxh3 `{fingerprint}`).

Run it with the settings it was trained for; the pipeline's defaults (50 steps, guidance 7.5) are
the teacher's, not the student's:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{out}")
image = pipe(prompt, num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}).images[0]
```

- recommended `num_inference_steps`: {num_inference_steps}
- recommended `guidance_scale`: {guidance_scale} (guidance is distilled into the student)
- run: `{run}`, step {step}
"""


def _prepare_out(out_url: str):
    """The filesystem and path of an export folder that does not exist or is empty."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out_url)
    if fs.exists(path):
        if not fs.isdir(path):
            raise CheckpointError(f"export --out {out_url} is a file; give a folder")
        if fs.ls(path):
            raise CheckpointError(f"export --out {out_url} is not empty; give a new folder (nothing was written)")
    return fs, path


def _data_fingerprint(data_url: str) -> str:
    import xxhash

    from store import PairStore, parse_url

    try:
        fingerprint = PairStore(parse_url(data_url)[0]).read_fingerprint()
    except Exception:  # the card is documentation; an unreachable store must not block an export
        return "unavailable"
    return xxhash.xxh3_64_hexdigest(json.dumps(fingerprint, sort_keys=True).encode()) if fingerprint else "none"


def export_student(run_url: str, out_dir: str, step: int | None = None, use_ema: bool = True) -> dict:
    """Write the student of run `run_url` (checkpoint `step`, default the latest complete one; its
    EMA weights when `use_ema` and saved) as a diffusers pipeline folder at `out_dir` (any fsspec
    URL; it must not exist or be empty), with a model card (README.md) and STUDENT_INFO.

    Returns what was exported: run, step, weights, out, and `skipped_incomplete_step` when a newer
    checkpoint exists but is incomplete. CheckpointError if there is no such complete checkpoint.
    """
    import tempfile

    checkpoints = CheckpointStore(run_url)
    latest = checkpoints.latest()
    step = step if step is not None else latest
    if step is None:
        raise CheckpointError(f"{run_url} has no complete checkpoint to export")
    if step not in checkpoints.complete_steps():
        raise CheckpointError(f"{run_url} has no complete checkpoint at step {step}; complete: "
                              f"{checkpoints.complete_steps()}")
    newer_incomplete = [s for s in checkpoints.incomplete_steps() if s > step]
    fs, out_path = _prepare_out(out_dir)
    weights, _, state = checkpoints.load(step, ["generator", "ema"])
    config = TrainConfig(**state["config"])
    source = "ema" if use_ema and "ema" in weights else "generator"
    pipe = load_teacher(config.teacher, device="cpu")
    pipe.unet.load_state_dict(_student_unet_weights(weights[source]))
    pipe.scheduler = one_step_scheduler(dict(pipe.scheduler.config))
    info = {"run": run_url, "step": step, "weights": source, "teacher": config.teacher,
            "objective": config.objective, "num_inference_steps": 1, "guidance_scale": 0.0,
            "student_steps": config.objective_config.student_steps, "data": config.data, "out": out_dir,
            "data_fingerprint_xxh3": _data_fingerprint(config.data)}
    if newer_incomplete and step == latest:
        info["skipped_incomplete_step"] = newer_incomplete[-1]
    base_model = config.teacher if config.teacher not in ("shapes", "shapes-xl") else f"d2g/{config.teacher}"
    card = MODEL_CARD.format(base_model=base_model, teacher=config.teacher, objective=config.objective, step=step,
                             weights=source, data=config.data, fingerprint=info["data_fingerprint_xxh3"],
                             out=out_dir, num_inference_steps=1, guidance_scale=0.0, run=run_url)
    with tempfile.TemporaryDirectory(prefix="d2g-export-") as staging:
        pipe.save_pretrained(staging)
        Path(staging, STUDENT_INFO).write_text(json.dumps(info, indent=2))
        Path(staging, "README.md").write_text(card)
        # Written aside, then copied: a local folder or an object store gets the same files.
        fs.makedirs(out_path, exist_ok=True)
        fs.put(staging.rstrip("/") + "/", out_path, recursive=True)
    return info


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

    cond = TextConditioner(pipe)({PROMPT: prompts, NOISE: noise}, tuple(noise.shape[-2:]))
    schedule = NoiseSchedule(pipe.scheduler)
    t = torch.full((noise.shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long)
    pred = pipe.unet(noise, t, **cond.unet_kwargs()).sample
    return schedule.to_x0(pred, noise, t)


def _next_free_numbers(fs, folder: str, stem: str, count: int) -> list[int]:
    """`count` file numbers after the highest STEM-NNN.png already in `folder` (never overwrite)."""
    import re

    try:
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        names = []
    taken = [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.png", n))]
    first = max(taken) + 1 if taken else 0
    return list(range(first, first + count))


def save_pngs(images: torch.Tensor, folder: str, stem: str = "image", metadata: list[dict] | None = None) -> list[str]:
    """Images [N, 3, H, W] in [0, 1] as FOLDER/STEM-NNN.png (any fsspec URL), numbered after the
    files already there so nothing is overwritten; `metadata[i]` goes into image i's PNG text
    chunks. Returns the paths."""
    import io

    import fsspec
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    paths = []
    for image, number in zip(images, _next_free_numbers(fs, root, stem, len(images)), strict=True):
        array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        text = PngInfo()
        for key, value in (metadata[len(paths)] if metadata else {}).items():
            text.add_text(key, str(value))
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", pnginfo=text)
        path = posixpath.join(root, f"{stem}-{number:03d}.png")
        with fs.open(path, "xb" if "s3" in str(fs.protocol) else "wb") as f:
            f.write(buffer.getvalue())
        paths.append(folder.rstrip("/") + "/" + posixpath.basename(path) if "://" in folder else path)
    return paths


def generate_pngs(model_dir: str, prompts: list[str], num: int, seed: int, out: str) -> list[str]:
    """`num` images per prompt from an exported student, one step each, saved by `save_pngs` with
    their prompt, seed, noise index, steps and model recorded in the PNG. Noise i is
    d2g.teacher.noise.sample_noise(seed, i), as in pairgen, so (seed, i) reproduces image i."""
    from d2g.teacher.noise import sample_noise
    from d2g.teacher.vae import decode, latent_shape, to_unit_range

    pipe = load_student(model_dir)
    texts = [p for p in prompts for _ in range(num)]
    shape = latent_shape(pipe)
    noise = torch.stack([sample_noise(seed, i, shape) for i in range(len(texts))])
    with torch.no_grad():
        images = to_unit_range(decode(pipe.vae, student_latents(pipe, texts, noise)))
    metadata = [{"prompt": t, "seed": seed, "noise_index": i, "steps": 1, "model": os.path.abspath(model_dir)
                 if "://" not in model_dir else model_dir, "generator": "d2g"} for i, t in enumerate(texts)]
    return save_pngs(images, out, metadata=metadata)
