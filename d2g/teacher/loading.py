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
    "shapes-sd3": Path(__file__).parents[1] / "shapes" / "weights" / "teacher-sd3",  # SD3 layout, no T5
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
    if name_or_path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name_or_path:
        raise TeacherError(f"teacher folder {name_or_path} does not exist")
    return name_or_path  # a hub id: from_pretrained resolves it (offline it uses the local cache only)


def absolute_teacher(name_or_path: str) -> str:
    """A teacher reference that means the same from any working directory (Ray workers run
    elsewhere): a local folder made absolute; a built-in alias or a hub id as given, even when the
    current directory has a folder of that name."""
    if name_or_path in ALIASES or not os.path.isdir(name_or_path):
        return name_or_path
    return os.path.abspath(name_or_path)


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


# Files that must exist in a local component folder for `from_pretrained` to build it.
_COMPONENT_CONFIGS = {"scheduler": ("scheduler_config.json",), "tokenizer": ("tokenizer_config.json",),
                      "tokenizer_2": ("tokenizer_config.json",), "tokenizer_3": ("tokenizer_config.json",)}
DENOISERS = ("unet", "transformer")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_model_index(name_or_path: str, revision: str | None = None) -> dict:
    """A teacher's model_index.json (no weights loaded); TeacherError naming the teacher if absent."""
    from diffusers import DiffusionPipeline

    source = resolve_teacher(name_or_path)
    try:
        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot find teacher {name_or_path!r} (a built-in alias {sorted(ALIASES)}, a local "
                           f"diffusers folder, or a hub id in the local cache): {_first_line(err)}") from None


def read_scheduler_config(name_or_path: str, revision: str | None = None) -> dict:
    """A teacher's scheduler/scheduler_config.json (with its `_class_name`), no weights loaded."""
    from diffusers import DDIMScheduler

    source = resolve_teacher(name_or_path)
    try:
        # Any scheduler class reads the file as it is; nothing is instantiated.
        return dict(DDIMScheduler.load_config(source, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as err:
        raise TeacherError(f"teacher {name_or_path!r}: cannot read its scheduler config: {_first_line(err)}") from None


def check_teacher(name_or_path: str, revision: str | None = None) -> dict:
    """Check, without loading any weights, that a teacher can be loaded: its model_index.json, a
    denoiser, a VAE, and each listed component's config. Returns the model index. Meant for a driver
    to run before it starts Ray or writes anything, so a bad --teacher costs one line, not a cluster."""
    source = resolve_teacher(name_or_path)
    index = read_model_index(name_or_path, revision)
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    if not components & set(DENOISERS):
        raise TeacherError(f"teacher {name_or_path!r} ({index.get('_class_name')}) has no UNet or transformer")
    if "vae" not in components:
        raise TeacherError(f"teacher {name_or_path!r} ({index.get('_class_name')}) has no VAE")
    if os.path.isdir(source):
        for name in sorted(components):
            needed = _COMPONENT_CONFIGS.get(name, ("config.json",))
            folder = Path(source) / name
            if not any((folder / f).exists() for f in needed):
                raise TeacherError(f"teacher {source}: component {name!r} is listed in model_index.json but "
                                   f"{folder / needed[0]} does not exist")
    return index


def _dtype_kwarg() -> str:
    # diffusers renamed from_pretrained's torch_dtype to dtype (huggingface/diffusers#14205) and warns
    # on the old name; older releases only know the old one.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def drop_t5_kwargs(name_or_path: str, revision: str | None = None) -> dict:
    """The from_pretrained kwargs that load an SD3-style teacher without its T5 encoder
    (`text_encoder_3=None, tokenizer_3=None`, as diffusers documents for StableDiffusion3Pipeline,
    which then puts zeros where the T5 tokens go). TeacherError for any other teacher: FLUX's token
    embeddings are T5's alone, and UNet teachers have no T5."""
    index = read_model_index(name_or_path, revision)
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        raise TeacherError(f"option drop_t5: only StableDiffusion3Pipeline teachers can drop their T5 encoder; "
                           f"teacher {name_or_path!r} is a {index.get('_class_name')}")
    return {"text_encoder_3": None, "tokenizer_3": None}


def _saved_without_t5(source: str, revision: str | None) -> dict:
    """`drop_t5_kwargs` for a local SD3 folder saved without its T5 (e.g. an export of a student of
    a drop_t5 teacher): its model_index lists text_encoder_3 as null, and from_pretrained refuses it
    unless told text_encoder_3=None."""
    if not os.path.isdir(source):
        return {}
    index = read_model_index(source, revision)
    if index.get("_class_name") == "StableDiffusion3Pipeline" and not (index.get("text_encoder_3") or [None])[0]:
        return {"text_encoder_3": None, "tokenizer_3": None}
    return {}


def t5_dropped(pipe) -> bool:
    """Whether `pipe` is an SD3-style pipeline loaded without its T5 encoder (`drop_t5`)."""
    return type(pipe).__name__ == "StableDiffusion3Pipeline" and getattr(pipe, "text_encoder_3", None) is None


def load_teacher(name_or_path: str, dtype: str = "fp32", device: str | None = None, revision: str | None = None,
                 drop_t5: bool = False):
    """Load a teacher pipeline with `DiffusionPipeline.from_pretrained`, frozen (see `freeze`).

    Args:
        name_or_path: a built-in alias (`shapes`, `shapes-xl`, `shapes-sd3`), a local diffusers
            folder, or a hub id (SD1.5/SDXL-style UNet pipelines; SD3/FLUX-style transformer pipelines).
        dtype: fp32, fp16 or bf16 (or the torch spelling).
        device: a torch device, or None / "auto" for the best available.
        revision: the hub revision, for hub ids.
        drop_t5: SD3-style teachers only: load without the T5 encoder (`drop_t5_kwargs`); its
            weights (4.7B parameters in SD3-medium) are never read, and prompt embeddings carry zeros
            where the T5 tokens go. It changes the teacher's outputs, so record it with the pairs.
    """
    from diffusers import DiffusionPipeline

    source = resolve_teacher(name_or_path)
    components = drop_t5_kwargs(name_or_path, revision) if drop_t5 else _saved_without_t5(source, revision)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, **components,
                                                 **{_dtype_kwarg(): parse_dtype(dtype)})
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
