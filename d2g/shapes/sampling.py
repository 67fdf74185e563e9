"""Sampling helpers for the shapes teacher: prompts from the world, images from the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from d2g.shapes import world

TEACHER_PATH = Path(__file__).parent / "weights" / "teacher"
TEACHER_XL_PATH = Path(__file__).parent / "weights" / "teacher-xl"


def load_pipeline(path: str | Path = TEACHER_PATH):
    """The teacher (a StableDiffusionPipeline, StableDiffusionXLPipeline for teacher-xl, or
    StableDiffusion3Pipeline for teacher-sd3), loaded
    offline, frozen and quiet, through the one teacher loader."""
    from d2g.teacher.loading import TeacherError, load_teacher

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise TeacherError(f"no shapes teacher at {path} (model_index.json missing); train it with "
                           "`python -m d2g.shapes.train` (docs/SHAPES.md)")
    return load_teacher(str(path), device="cpu")


def prompts(seed: int, count: int, split: str = "train") -> tuple[list[str], list[world.Attributes]]:
    """`count` captions of the world (and their attributes) drawn with `seed`."""
    texts, attrs = [], []
    for index in range(count):
        a, phrasing = world.sample_attributes(seed, index, split)
        texts.append(world.caption(a, phrasing))
        attrs.append(a)
    return texts, attrs


def _deterministic(pipe) -> dict:
    # DDIM (the UNet teachers) is the deterministic ODE solver at eta 0; the flow-matching (SD3-layout)
    # pipeline's Euler solver is deterministic as it is and takes no eta.
    import inspect

    return {"eta": 0.0} if "eta" in inspect.signature(pipe.__call__).parameters else {}


@torch.no_grad()
def generate(pipe, texts: list[str], steps: int = 25, guidance: float = 3.0, seed: int = 0,
             batch_size: int = 256) -> np.ndarray:
    """uint8 Nx32x32x3 samples, one per prompt; image i uses noise seed `seed + i`, so results do not
    depend on batch_size."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np", **_deterministic(pipe)).images
        out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)
