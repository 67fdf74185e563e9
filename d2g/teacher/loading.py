"""Load a diffusers text-to-image teacher by hub id, local path or built-in alias."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Built-in teachers that ship inside the package (trained by the project's own scripts).
ALIASES = {
    "shapes": Path(__file__).parents[1] / "shapes" / "weights" / "teacher",  # SD1.5 layout
    "shapes-xl": Path(__file__).parents[1] / "shapes" / "weights" / "teacher-xl",  # SDXL layout
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class TeacherError(ValueError):
    """A teacher that cannot be loaded or used; the message names the path and the reason."""


def resolve_teacher(name_or_path: str) -> str:
    """Map an alias to its packaged folder; check a local folder is a diffusers pipeline."""
    if name_or_path in ALIASES:
        path = ALIASES[name_or_path]
        if not (path / "model_index.json").exists():
            raise TeacherError(
                f"built-in teacher {name_or_path!r} has no weights at {path}; "
                "train it with `python -m d2g.shapes.train` (see docs/SHAPES.md)"
            )
        return str(path)
    if os.path.isdir(name_or_path):
        index = Path(name_or_path) / "model_index.json"
        if not index.exists():
            raise TeacherError(f"teacher path {name_or_path} is not a diffusers pipeline: no model_index.json")
        try:
            json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise TeacherError(f"teacher path {name_or_path}: model_index.json is not valid JSON ({err})") from err
        return name_or_path
    if os.path.exists(name_or_path):
        raise TeacherError(f"teacher path {name_or_path} is a file; expected a diffusers pipeline folder")
    return name_or_path  # a hub id: from_pretrained resolves it (offline it uses the local cache only)


def pick_device(device: str | None = None) -> torch.device:
    """`device` as given, or for None/"auto" the best available: cuda, then mps, then cpu."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its short name (fp32, fp16, bf16 or the torch spelling); TeacherError if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TeacherError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def load_teacher(name_or_path: str, dtype: str = "fp32", device: str | None = None, revision: str | None = None):
    """Load a teacher pipeline with `DiffusionPipeline.from_pretrained`, in eval mode, no progress bars."""
    from diffusers import DiffusionPipeline

    source = resolve_teacher(name_or_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=parse_dtype(dtype), revision=revision)
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot load teacher {name_or_path!r}: {err}") from err
    if not hasattr(pipe, "unet") and not hasattr(pipe, "transformer"):
        raise TeacherError(f"teacher {name_or_path!r} ({type(pipe).__name__}) has no UNet or transformer denoiser")
    pipe.to(pick_device(device))
    return freeze(pipe)


def freeze(pipe):
    """Every torch module of the pipeline in eval mode without gradients, progress bars off.
    Trainable copies (students, discriminators) are made from a frozen pipeline explicitly."""
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe
