"""store.layout and store.schema pin every on-disk name; the shard writer needs only a destination."""

from __future__ import annotations

import dataclasses
import os

import pytest

import store
from store import PairStore, ShardDestination, ShardWriter, layout
from tests.helpers.store_data import FINGERPRINT, SCHEMA, make_dataset, sample_arrays


def test_names_are_the_format():
    # Changing any of these strings breaks every existing store: they are format version 1.
    assert layout.fingerprint_path("s3://b/pairs") == "s3://b/pairs/fingerprint.json"
    assert layout.tar_path("/data/p", "shard-000012") == "/data/p/shards/shard-000012.tar"
    assert layout.index_path("/data/p", "shard-000012") == "/data/p/index/shard-000012.parquet"
    assert layout.manifest_path("/data/p", 3) == "/data/p/versions/v000003.json"
    assert layout.shard_name(12) == "shard-000012"
    assert layout.partial_shard_name(12, 232) == "shard-000012-p000232"
    assert layout.default_key(12) == "000000000012"
    assert layout.member_file("000000000012", "json") == "000000000012.json"
    assert layout.member_file("000000000012", "noise") == "000000000012.noise.npy"
    assert (store.NOISE, store.LATENT, store.PROMPT_EMBEDS, store.POOLED_PROMPT_EMBEDS, store.TRAJECTORY) == (
        "noise", "latent", "prompt_embeds", "pooled_prompt_embeds", "trajectory")
    assert (store.KEY, store.INDEX, store.PROMPT, store.SEED, store.META, store.JSON, store.SHARD) == (
        "key", "index", "prompt", "seed", "meta", "json", "shard")
    assert store.TRAJECTORY_TIMESTEPS == "trajectory_timesteps"


def test_names_parse_back():
    assert layout.shard_of_tar_file("shard-000001.tar") == "shard-000001"
    assert layout.shard_of_index_file("shard-000001.parquet") == "shard-000001"
    assert layout.version_of_manifest_file("v000003.json") == 3
    assert layout.shard_number("shard-000012") == layout.shard_number("shard-000012-p000232") == 12
    tmp = layout.temp_path("/data/p/shards/shard-000001.tar")
    assert tmp.startswith("/data/p/shards/.shard-000001.tar.tmp-") and tmp != layout.temp_path("/data/p/shards/shard-000001.tar")
    for hidden_or_other in (os.path.basename(tmp), "notes.txt"):
        assert layout.shard_of_tar_file(hidden_or_other) is None and layout.shard_of_index_file(hidden_or_other) is None
    assert layout.version_of_manifest_file("v3.json") is None and layout.shard_number("mine") is None
    assert layout.is_valid_shard_name("shard-000001") and not layout.is_valid_shard_name(".x")
    assert not layout.is_valid_shard_name("a/b") and not layout.is_valid_shard_name(3)


def test_a_store_holds_exactly_the_layout_names(tmp_path):
    st = make_dataset(str(tmp_path / "pairs"), shards=2, per_shard=2)
    found = {str(p.relative_to(tmp_path / "pairs")) for p in (tmp_path / "pairs").rglob("*") if p.is_file()}
    names = [layout.shard_name(i) for i in range(2)]
    expected = {layout.fingerprint_path(""), layout.manifest_path("", 1)}
    expected |= {layout.tar_path("", n) for n in names} | {layout.index_path("", n) for n in names}
    assert found == expected
    assert st.shard_url(names[0]) == layout.tar_path(st.url, names[0])


def test_writer_needs_only_a_destination(tmp_path):
    """ShardWriter writes wherever its destination says, after the destination's check."""
    import fsspec

    root = str(tmp_path / "pairs")
    calls = []
    dest = ShardDestination.in_root(fsspec.filesystem("file"), root, "shard-000000", lambda: calls.append("prepare"))
    with ShardWriter(dest, "shard-000000", SCHEMA) as w:
        assert calls == ["prepare"]
        w.write(layout.default_key(0), 0, "prompt number 0", 0, sample_arrays(0))
    st = PairStore(root)
    st.ensure_fingerprint(FINGERPRINT)
    assert st.shard_info("shard-000000") == w.info and st.commit([w.info], None).num_pairs == 1

    def refuse():
        raise store.StoreError("no")

    with pytest.raises(store.StoreError, match="no"):
        with ShardWriter(dataclasses.replace(dest, prepare=refuse), "shard-000000", SCHEMA):
            pass

