"""A committed shard damaged on storage is never papered over: pairgen refuses to run (naming the
shard and the repair command), `store verify` reports it, and --repair restores the exact bytes and
commits a new version with the same number of pairs."""

from __future__ import annotations

import subprocess
import sys

import fsspec
import numpy as np
import pytest

from pairgen.runner import PairgenRun, RunError
from store import PairStore, StoreError, layout
from tests.pairgen.test_run import PROMPTS, _config


def _tar_bytes(url: str, name: str) -> bytes:
    st = PairStore(url)
    return st.fs.cat_file(layout.tar_path(st.root, name))


def test_damaged_committed_shard_is_refused_then_repaired_byte_identical(ray_local, sd15_teacher, tmp_path,
                                                                           root_url):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    config = _config(sd15_teacher, str(prompts), root_url, num_pairs=12, shard_size=4)
    PairgenRun(config, progress=False).run()
    store = PairStore(root_url)
    original = _tar_bytes(root_url, "shard-000001")
    with fsspec.open(layout.tar_path(root_url, "shard-000001"), "wb") as f:  # truncated on storage
        f.write(original[: len(original) // 2])

    with pytest.raises(RunError, match=r"shard-000001: its tar is \d+ bytes.*--repair"):
        PairgenRun(config, progress=False).run()
    assert store.versions() == [1] and store.manifest().num_pairs == 12

    verify = subprocess.run([sys.executable, "-m", "store.cli", "verify", root_url], capture_output=True, text=True)
    assert verify.returncode == 1 and "shard-000001" in verify.stdout + verify.stderr

    summary = PairgenRun(config.model_copy(update={"repair": True}), progress=False).run()
    assert summary.shards_repaired == ["shard-000001"] and summary.pairs_generated == 4
    assert _tar_bytes(root_url, "shard-000001") == original
    assert store.versions() == [1, 2] and store.manifest(2).num_pairs == 12
    assert store.manifest(2).shards == store.manifest(1).shards
    verify = subprocess.run([sys.executable, "-m", "store.cli", "verify", root_url, "--deep"], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_repair_with_other_settings_replaces_nothing(ray_local, sd15_teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    root = str(tmp_path / "pairs")
    config = _config(sd15_teacher, str(prompts), root, num_pairs=8, shard_size=4)
    PairgenRun(config, progress=False).run()
    store = PairStore(root)
    damaged = _tar_bytes(root, "shard-000000")[:100]
    with open(layout.tar_path(root, "shard-000000"), "wb") as f:
        f.write(damaged)
    expected = store.manifest().shards[0]
    # A writer fed other samples than the originals: the repair must refuse to publish them.
    schema = store.manifest().schema
    with pytest.raises(StoreError, match="produced other bytes"):
        with store.repair_shard_writer(expected, schema) as writer:
            for j in range(4):
                arrays = {name: np.zeros(spec.shape, dtype=spec.dtype) for name, spec in schema.fields.items()}
                writer.write(key=f"{j:012d}", index=j, prompt="other", seed=0, arrays=arrays)
    assert _tar_bytes(root, "shard-000000") == damaged
    assert not [f for f in (tmp_path / "pairs" / "shards").iterdir() if f.name.startswith(".")]
