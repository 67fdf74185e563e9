"""Versions: exclusive commits, URL@vN naming, fingerprints, format-version refusal, random access."""

from __future__ import annotations

import json
import threading

import fsspec
import pytest

from store import FingerprintMismatch, PairStore, StoreError, VersionConflict, parse_url
from tests.helpers.store_data import FINGERPRINT, make_dataset, write_shard


def test_parse_url():
    assert parse_url("s3://b/pairs@v3") == ("s3://b/pairs", 3)
    assert parse_url("/data/pairs/") == ("/data/pairs", None)
    assert parse_url("s3://user@host/x") == ("s3://user@host/x", None)
    with pytest.raises(StoreError, match="ROOT@vN"):
        parse_url("/data/pairs@vlatest")


def test_commit_chain_and_manifest_fields(root_url):
    st = make_dataset(root_url, shards=2, per_shard=3)
    m1 = st.manifest()
    assert (m1.version, m1.parent, m1.num_pairs, m1.num_shards) == (1, None, 6, 2)
    extra = write_shard(st, 2, 3)
    m2 = st.commit([*m1.shards, extra], parent=1, extra={"prompts": "coco-2014", "step": 2})
    assert st.versions() == [1, 2] and st.latest_version() == 2
    d = json.loads(fsspec.open(f"{st.url}/versions/v000002.json", "rb").open().read())
    assert d["format"] == "d2g-pairs" and d["format_version"] == 1
    assert (d["version"], d["parent"], d["num_pairs"]) == (2, 1, 9)
    assert d["fingerprint"] == FINGERPRINT and d["extra"]["prompts"] == "coco-2014"
    assert d["schema"]["fields"]["latent"] == {"dtype": "float16", "shape": [4, 8, 8]}
    assert [s["name"] for s in d["shards"]] == ["shard-000000", "shard-000001", "shard-000002"]
    assert d["bytes"] == m2.bytes > 0 and d["created"].endswith("Z")
    # Versions stay readable as they were.
    assert PairStore(st.url).manifest(1).num_pairs == 6


def test_concurrent_commits_of_one_version_have_one_winner(root_url):
    st = make_dataset(root_url, shards=2, per_shard=2, commit=False)
    infos = sorted(st.complete_shards().values(), key=lambda s: s.name)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def commit(tag: str, shards):
        store = PairStore(root_url)  # separate instances, as two processes would have
        barrier.wait()
        try:
            results[tag] = store.commit(shards, None, extra={"writer": tag})
        except VersionConflict as exc:
            results[tag] = exc

    threads = [threading.Thread(target=commit, args=("a", infos[:1])), threading.Thread(target=commit, args=("b", infos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [k for k, v in results.items() if not isinstance(v, Exception)]
    losses = [v for v in results.values() if isinstance(v, VersionConflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert "v1" in str(losses[0]) and "retry" in str(losses[0])
    m = PairStore(root_url).manifest(1)
    assert m.extra["writer"] == wins[0] and m.shards == results[wins[0]].shards


def test_fingerprint_mismatch_lists_each_difference(root_url):
    st = make_dataset(root_url, shards=1, per_shard=1, commit=False)  # a shard: the settings are in use
    st.ensure_fingerprint(dict(FINGERPRINT))  # same settings: fine
    changed = {**FINGERPRINT, "guidance": 8.0, "scheduler": {"name": "DDIM", "steps": 50}}
    with pytest.raises(FingerprintMismatch) as err:
        st.ensure_fingerprint(changed)
    msg = str(err.value)
    assert "guidance: stored 3.0 vs requested 8.0" in msg
    assert "scheduler.steps: stored 4 vs requested 50" in msg and "teacher" not in msg
    assert PairStore(root_url).read_fingerprint() == FINGERPRINT


def test_credentials_never_reach_a_manifest(root_url):
    st = make_dataset(root_url, shards=1, per_shard=1, commit=False)
    with pytest.raises(StoreError, match="credential"):
        st.commit(list(st.complete_shards().values()), None, extra={"s3": {"aws_secret_access_key": "x"}})
    assert st.versions() == []


def test_newer_format_version_is_refused(root_url):
    make_dataset(root_url, shards=1, per_shard=1)
    fs, path = fsspec.core.url_to_fs(root_url)
    d = json.loads(fs.cat_file(f"{path}/versions/v000001.json"))
    d.update(version=2, parent=1, format_version=2)
    fs.pipe_file(f"{path}/versions/v000002.json", json.dumps(d).encode())
    with pytest.raises(StoreError, match=r"v000002\.json.*format_version 2.*format_version 1"):
        PairStore(root_url).manifest()
    assert PairStore(root_url).manifest(1).version == 1


def test_missing_version_and_missing_root_are_named(root_url):
    st = make_dataset(root_url, shards=1, per_shard=1)
    st.commit(st.manifest().shards, parent=1)
    with pytest.raises(StoreError, match=r"@v7: no such version; existing versions: v1, v2"):
        st.manifest(7)
    with pytest.raises(StoreError, match="no committed versions.*existing versions: none"):
        PairStore(root_url + "-nothing-here").manifest()


def test_commit_refuses_incomplete_or_mismatched_shards(root_url):
    st = make_dataset(root_url, shards=1, per_shard=2, commit=False)
    info = st.shard_info("shard-000000")
    from dataclasses import replace

    with pytest.raises(StoreError, match="shard-000000.*does not match storage"):
        st.commit([replace(info, num_samples=3)], None)
    with pytest.raises(StoreError, match="shard-000009.*missing"):
        st.commit([replace(info, name="shard-000009")], None)
    assert st.versions() == []


def test_random_access_by_index_and_key_across_versions(root_url):
    st = make_dataset(root_url, shards=3, per_shard=4)
    assert st.get(index=9)["key"] == "000000000009"
    s = st.get(key="000000000002", fields=["latent"])
    assert set(s) == {"index", "key", "latent", "shard"} and s["index"] == 2
    assert st.get(index=5, version=1)["shard"] == "shard-000001"
    with pytest.raises(StoreError, match="no sample with index 99"):
        st.get(index=99)
    with pytest.raises(StoreError, match=r"unknown field\(s\) \['pixels'\]"):
        st.get(index=0, fields=["pixels"])


def test_any_fsspec_filesystem_memory():
    import uuid

    url = f"memory://store-test-{uuid.uuid4().hex[:8]}/pairs"
    st = make_dataset(url, shards=2, per_shard=2)
    with pytest.raises(VersionConflict):
        st.commit(st.manifest().shards, None)
    assert PairStore(url).get(index=3)["key"] == "000000000003"
    assert sorted(st.complete_shards()) == ["shard-000000", "shard-000001"]
