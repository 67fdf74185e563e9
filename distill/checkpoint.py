"""Training checkpoints on any fsspec URL, written so a reader never sees half of one.

Layout: RUN/checkpoints/step-00001000/{generator,ema,discriminator}.safetensors, optimizers.pt,
rng.pt, state.json, and COMPLETE, written last. A folder without COMPLETE is ignored (and
overwritten); one with COMPLETE is never overwritten. Weights are safetensors; optimiser and RNG
states are loaded with torch.load(weights_only=True).
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

STEP_DIR = re.compile(r"step-(\d{8})$")
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def _url_to_fs(url: str):
    options = {"use_listings_cache": False} if "://" in url and not url.startswith(("file://", "memory://")) else {}
    return fsspec.core.url_to_fs(url, **options)


class CheckpointStore:
    def __init__(self, run_url: str):
        self.url = run_url.rstrip("/")
        self.fs, root = _url_to_fs(self.url)
        self.root = posixpath.join(root.rstrip("/"), "checkpoints")

    def _dir(self, step: int) -> str:
        return posixpath.join(self.root, f"step-{step:08d}")

    def complete_steps(self) -> list[int]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            match = STEP_DIR.search(entry.rstrip("/"))
            if match and self.fs.exists(posixpath.join(self._dir(int(match.group(1))), MARKER)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def _write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], objects: dict, state: dict) -> None:
        """weights: name -> state dict (safetensors); objects: optimiser/scaler/RNG states; state: JSON."""
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
        """Delete all but the newest `keep` complete checkpoints (and stale incomplete folders)."""
        complete = self.complete_steps()
        doomed = complete[:-keep] if keep else complete
        for step in doomed:
            # Remove the marker first: a half-deleted folder must look incomplete, not corrupt.
            self.fs.rm(posixpath.join(self._dir(step), MARKER))
            self.fs.rm(self._dir(step), recursive=True)
