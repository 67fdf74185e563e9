"""Helpers shared by the store tests (tests/store/) and others that need a pair store: tiny
deterministic pair datasets."""

from __future__ import annotations

import numpy as np

from store import LATENT, NOISE, FieldSpec, PairStore, Schema, layout

SHAPE = (4, 8, 8)
SCHEMA = Schema({NOISE: FieldSpec("float32", SHAPE), LATENT: FieldSpec("float16", SHAPE)})
FINGERPRINT = {"teacher": "tiny-sd15", "scheduler": {"name": "DDIM", "steps": 4}, "guidance": 3.0}


def sample_arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    return {
        NOISE: rng.standard_normal(SHAPE, dtype=np.float32),
        LATENT: rng.standard_normal(SHAPE).astype(np.float16),
    }


def write_shard(st: PairStore, shard: int, per_shard: int, schema: Schema = SCHEMA):
    with st.open_shard_writer(layout.shard_name(shard), schema) as w:
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            w.write(layout.default_key(i), i, f"prompt number {i}", 7 * i, sample_arrays(i))
    return w.info


def make_dataset(url: str, shards: int = 3, per_shard: int = 7, commit: bool = True) -> PairStore:
    st = PairStore(url)
    st.ensure_fingerprint(FINGERPRINT)
    infos = [write_shard(st, s, per_shard) for s in range(shards)]
    if commit:
        st.commit(infos, None)
    return st
