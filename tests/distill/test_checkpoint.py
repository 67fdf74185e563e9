"""Checkpoint folders: COMPLETE last, committed ones immutable, pruning of old and stale folders."""

from __future__ import annotations

import pytest
import torch

from distill.checkpoint import MARKER, CheckpointError, CheckpointStore


def _save(store: CheckpointStore, step: int, value: float = 0.0) -> None:
    store.save(step, {"generator": {"w": torch.full((2,), value)}}, {"opt": {"lr": 1.0}}, {"step": step})


def test_save_load_and_committed_checkpoints_are_immutable(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    _save(store, 5, 1.0)
    _save(store, 5, 2.0)
    weights, objects, state = store.load(5, ["generator", "ema"])
    assert set(weights) == {"generator"} and weights["generator"]["w"].tolist() == [1.0, 1.0]
    assert objects == {"opt": {"lr": 1.0}} and state == {"step": 5}
    written = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-00000005").iterdir())
    assert written == [MARKER, "generator.safetensors", "objects.pt", "state.json"]


def test_incomplete_folders_are_ignored_then_pruned_when_stale(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (2, 4, 6, 8):
        _save(store, step)
    folders = tmp_path / "run" / "checkpoints"
    (folders / "step-00000003").mkdir()  # a crash mid-save, long ago
    (folders / "step-00000003" / "generator.safetensors").write_bytes(b"half")
    (folders / "step-00000004" / MARKER).unlink()  # a crash mid-prune: marker gone, files left
    (folders / "step-00000009").mkdir()  # newer than every complete checkpoint: may be in progress
    assert store.complete_steps() == [2, 6, 8] and store.latest() == 8
    with pytest.raises(CheckpointError, match="step-00000004 is not complete"):
        store.load(4, ["generator"])
    store.prune(2)
    assert sorted(p.name for p in folders.iterdir()) == ["step-00000006", "step-00000008", "step-00000009"]
    assert store.complete_steps() == [6, 8]
