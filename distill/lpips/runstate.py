"""Resumable training state: one atomically replaced checkpoint file per run directory.

The file holds only tensors, numbers and strings, so it is read back with
`torch.load(weights_only=True)`. Each step reseeds its own randomness from (seed, step), so a run
resumed at step k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def step_generator(seed: int, step: int) -> torch.Generator:
    """Independent, reproducible randomness for one step (batch choice, augmentation)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # readers see the old or the new checkpoint, never half of one
    return path


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_start(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from; refuses to overwrite a run unless --resume was given."""
    state = load_checkpoint(run_dir)
    if state is not None and not resume:
        raise FileExistsError(
            f"{run_dir / CHECKPOINT_NAME} exists: pass --resume to continue it, or choose another --out"
        )
    return state


def check_config(saved: dict, current: dict, run_dir: Path, ignore: tuple[str, ...] = ("steps",)) -> None:
    """A resumed run must use the options that produced its checkpoint (except `ignore`)."""
    for key, value in current.items():
        if key in ignore:
            continue
        if key in saved and saved[key] != value:
            raise ValueError(
                f"{run_dir}: option {key!r} was {saved[key]!r} in the checkpoint, now {value!r}; resume with the same value"
            )
