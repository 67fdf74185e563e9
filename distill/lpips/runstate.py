"""Resumable training state: one atomically replaced checkpoint file per run directory.

The file holds only tensors, numbers and strings, so it is read back with
`torch.load(weights_only=True)`. Each step reseeds its own randomness from (seed, step), so a run
resumed at step k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path

import torch

from store.atomic import write_local_file

CHECKPOINT_NAME = "checkpoint.pt"


def step_generator(seed: int, step: int) -> torch.Generator:
    """Independent, reproducible randomness for one step (batch choice, augmentation).

    Args:
        seed: the run's seed.
        step: the step number.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write `state` to RUN_DIR/checkpoint.pt atomically (readers see the old or the new file).

    Args:
        run_dir: the run directory (created if needed).
        state: tensors, numbers and strings only (it is read back with weights_only=True).
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    write_local_file(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(run_dir: Path) -> dict | None:
    """The run's checkpoint read with `torch.load(weights_only=True)`, or None if there is none.

    Args:
        run_dir: the run directory.
    """
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_start(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from; refuses to overwrite a run unless --resume was given.

    Args:
        run_dir: the run directory.
        resume: whether --resume was given.
    """
    state = load_checkpoint(run_dir)
    if state is not None and not resume:
        raise FileExistsError(
            f"{run_dir / CHECKPOINT_NAME} exists: pass --resume to continue it, or choose another --out"
        )
    return state


def check_config(saved: dict, current: dict, run_dir: Path, ignore: tuple[str, ...] = ("steps",)) -> None:
    """A resumed run must use the options that produced its checkpoint (except `ignore`).

    Args:
        saved: the checkpoint's options.
        current: this run's options.
        run_dir: the run directory (named in the error).
        ignore: options that may differ (e.g. the total number of steps).
    """
    for key, value in current.items():
        if key in ignore:
            continue
        if key in saved and saved[key] != value:
            raise ValueError(
                f"{run_dir}: option {key!r} was {saved[key]!r} in the checkpoint, now {value!r}; resume with the same value"
            )
