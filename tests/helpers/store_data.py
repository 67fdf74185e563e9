"""Helpers shared by the tests/test_store_*.py files: tiny deterministic pair datasets."""

from __future__ import annotations

import numpy as np

from store import FieldSpec, PairStore, Schema

SHAPE = (4, 8, 8)
SCHEMA = Schema({"noise": FieldSpec("float32", SHAPE), "latent": FieldSpec("float16", SHAPE)})
FINGERPRINT = {"teacher": "tiny-sd15", "scheduler": {"name": "DDIM", "steps": 4}, "guidance": 3.0}


def sample_arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    return {
        "noise": rng.standard_normal(SHAPE, dtype=np.float32),
        "latent": rng.standard_normal(SHAPE).astype(np.float16),
    }


def write_shard(st: PairStore, shard: int, per_shard: int, schema: Schema = SCHEMA):
    with st.open_shard_writer(st.shard_name(shard), schema) as w:
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            w.write(f"{i:012d}", i, f"prompt number {i}", 7 * i, sample_arrays(i))
    return w.info


def make_dataset(url: str, shards: int = 3, per_shard: int = 7, commit: bool = True) -> PairStore:
    st = PairStore(url)
    st.ensure_fingerprint(FINGERPRINT)
    infos = [write_shard(st, s, per_shard) for s in range(shards)]
    if commit:
        st.commit(infos, None)
    return st
