"""Training checkpoints on any fsspec URL, written so a reader never sees half of one.

Layout: RUN/checkpoints/step-00001000/ holds one `<name>.safetensors` per weight group the trainer
passes (generator, and ema and discriminator when it has them), objects.pt (optimiser,
grad-scaler and RNG states), state.json (step, data position, config...), and COMPLETE, written
last. A folder without COMPLETE is ignored: saving that step again writes over its files, and
`prune` deletes it once a newer checkpoint is complete. A folder with COMPLETE is never
overwritten. Weights are safetensors; objects.pt is loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import posixpath
import re

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from store.s3_retries import count_retries

STEP_DIR = re.compile(r"step-(\d{8})$")
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unusable; the message names it."""


def _url_to_fs(url: str):
    options = {"use_listings_cache": False} if "://" in url and not url.startswith(("file://", "memory://")) else {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    count_retries(fs)  # S3 requests re-sent after a failure count in store.s3_retries, as the store's do
    return fs, path


class CheckpointStore:
    """The checkpoints of one run: RUN/checkpoints/step-NNNNNNNN folders (see the module docstring).

    Args:
        run_url: the run folder URL (local path or any fsspec URL, e.g. s3://bucket/run).
    """

    def __init__(self, run_url: str):
        self.url = run_url.rstrip("/")
        self.fs, root = _url_to_fs(self.url)
        self.root = posixpath.join(root.rstrip("/"), "checkpoints")

    def _dir(self, step: int) -> str:
        return posixpath.join(self.root, f"step-{step:08d}")

    def _step_folders(self) -> dict[int, bool]:
        """step -> whether its folder is complete, for every step folder on storage."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            match = STEP_DIR.search(entry.rstrip("/"))
            if match:
                step = int(match.group(1))
                found[step] = self.fs.exists(posixpath.join(self._dir(step), MARKER))
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(step for step, complete in self._step_folders().items() if complete)

    def incomplete_steps(self) -> list[int]:
        """Steps whose folder exists without COMPLETE (a save that crashed or is under way), oldest first."""
        return sorted(step for step, complete in self._step_folders().items() if not complete)

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def _write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], objects: dict, state: dict) -> None:
        """Write checkpoint `step`, COMPLETE last; a step already complete is left as it is.

        weights: group name -> state dict (one safetensors file each); objects: optimiser, scaler
        and RNG states (objects.pt); state: JSON-serialisable run state (state.json)."""
        folder = self._dir(step)
        if self.fs.exists(posixpath.join(folder, MARKER)):
            return  # committed checkpoints are immutable
        for name, tensors in weights.items():
            cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            self._write(posixpath.join(folder, f"{name}.safetensors"), save_safetensors(cpu))
        buffer = io.BytesIO()
        torch.save(objects, buffer)
        self._write(posixpath.join(folder, "objects.pt"), buffer.getvalue())
        self._write(posixpath.join(folder, "state.json"), json.dumps(state, indent=1).encode())
        self._write(posixpath.join(folder, MARKER), str(step).encode())

    def load(self, step: int, weight_names: list[str]) -> tuple[dict, dict, dict]:
        """(weights, objects, state) of checkpoint `step`: the weight groups among `weight_names`
        that were saved (name -> state dict), the objects.pt dict and state.json. Raises
        CheckpointError if the checkpoint is not complete."""
        folder = self._dir(step)
        if not self.fs.exists(posixpath.join(folder, MARKER)):
            raise CheckpointError(f"checkpoint {self.url}/checkpoints/step-{step:08d} is not complete")
        weights = {}
        for name in weight_names:
            path = posixpath.join(folder, f"{name}.safetensors")
            if self.fs.exists(path):
                weights[name] = load_safetensors(self.fs.cat_file(path))
        objects = torch.load(io.BytesIO(self.fs.cat_file(posixpath.join(folder, "objects.pt"))),
                             weights_only=True, map_location="cpu")
        state = json.loads(self.fs.cat_file(posixpath.join(folder, "state.json")))
        return weights, objects, state

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and the incomplete folders older
        than the newest complete one: left by a crash mid-save or mid-prune, no save completes
        them. Newer incomplete folders stay (they may be a save in progress)."""
        folders = self._step_folders()
        complete = sorted(step for step, done in folders.items() if done)
        if not complete:
            return
        doomed = complete[:-keep] if keep else complete
        for step in doomed:
            # Remove the marker first: a half-deleted folder must look incomplete, not corrupt.
            self.fs.rm(posixpath.join(self._dir(step), MARKER))
            self.fs.rm(self._dir(step), recursive=True)
        for step, done in sorted(folders.items()):
            if not done and step < complete[-1]:
                self.fs.rm(self._dir(step), recursive=True)
