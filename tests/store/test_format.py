"""Shard format: byte-exact round trips, independent readers (webdataset, pyarrow, DuckDB), input
validation, and the rule that a half-written shard is invisible and gets overwritten."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from store import FieldSpec, PairStore, Schema, StoreError
from tests.helpers.store_data import FINGERPRINT, SCHEMA, SHAPE, make_dataset, sample_arrays, write_shard


def _cat(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def test_same_inputs_give_byte_identical_shards(root_url):
    a = make_dataset(root_url + "/a", shards=1, per_shard=5)
    b = make_dataset(root_url + "/b", shards=1, per_shard=5)
    for sub in ("shards/shard-000000.tar", "index/shard-000000.parquet"):
        assert _cat(f"{a.url}/{sub}") == _cat(f"{b.url}/{sub}"), sub
    assert a.manifest().shards == b.manifest().shards


def test_round_trip_is_bit_exact(root_url):
    st = make_dataset(root_url, shards=2, per_shard=4)
    for i in range(8):
        s = st.get(index=i)
        ref = sample_arrays(i)
        assert s["noise"].dtype == torch.float32 and s["latent"].dtype == torch.float16
        assert s["noise"].numpy().tobytes() == ref["noise"].tobytes()
        assert s["latent"].numpy().tobytes() == ref["latent"].tobytes()
        assert (s["prompt"], s["seed"], s["key"]) == (f"prompt number {i}", 7 * i, f"{i:012d}")


def test_bfloat16_kept_bit_exact(root_url):
    st = PairStore(root_url)
    st.ensure_fingerprint(FINGERPRINT)
    schema = Schema({"latent": FieldSpec("bfloat16", SHAPE)})
    x = torch.randn(SHAPE).to(torch.bfloat16)
    with st.open_shard_writer("shard-000000", schema) as w:
        w.write("k0", 0, "p", 0, {"latent": x})
    st.commit([w.info], None)
    got = st.get(key="k0")["latent"]
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), x.view(torch.int16))


def test_plain_webdataset_reads_our_tar(root_url):
    st = make_dataset(root_url, shards=1, per_shard=4)
    url = f"{st.url}/shards/shard-000000.tar"
    if "://" not in url:
        samples = list(wds.WebDataset(url, shardshuffle=False))
    else:  # webdataset has no s3 scheme of its own: hand it the stream
        from webdataset.tariterators import group_by_keys, tar_file_expander

        with fsspec.open(url, "rb") as f:
            samples = list(group_by_keys(tar_file_expander([{"url": url, "stream": f}])))
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(4)]
    for i, s in enumerate(samples):
        assert json.loads(s["json"])["prompt"] == f"prompt number {i}"
        assert np.array_equal(np.load(io.BytesIO(s["noise.npy"])), sample_arrays(i)["noise"])
        assert np.load(io.BytesIO(s["latent.npy"])).dtype == np.float16


def test_plain_pyarrow_reads_the_indexes(root_url):
    st = make_dataset(root_url, shards=3, per_shard=4)
    fs, path = fsspec.core.url_to_fs(st.url)
    table = pads.dataset(f"{path}/index", filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("index").to_pylist()) == list(range(12))
    assert {"key", "prompt", "seed", "noise_offset", "noise_size", "noise_xxh3", "json_offset"} <= set(table.column_names)
    # Offsets really point at the data: read one member by hand.
    row = table.filter(pads.field("index") == 5).to_pylist()[0]
    with fs.open(f"{path}/shards/shard-000001.tar", "rb") as f:
        f.seek(row["noise_offset"])
        blob = f.read(row["noise_size"])
    assert np.array_equal(np.load(io.BytesIO(blob)), sample_arrays(5)["noise"])
    meta = pq.read_metadata(fs.open(f"{path}/index/shard-000001.parquet", "rb")).metadata
    assert int(meta[b"d2g.tar_bytes"]) == st.manifest().shards[1].tar_bytes
    assert json.loads(meta[b"d2g.schema"])["fields"]["noise"] == {"dtype": "float32", "shape": list(SHAPE)}


def test_duckdb_reads_the_indexes(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    st = make_dataset(str(tmp_path / "pairs"), shards=2, per_shard=3)
    [(n, top)] = duckdb.sql(f"select count(*), max(index) from read_parquet('{st.url}/index/*.parquet')").fetchall()
    assert (n, top) == (6, 5)


def test_writer_rejects_bad_samples_naming_field_key_and_shard(root_url):
    st = PairStore(root_url)
    good = sample_arrays(0)
    with pytest.raises(StoreError, match=r"no '\.'"):
        with st.open_shard_writer("shard-000000", SCHEMA) as w:
            w.write("a.b", 0, "p", 0, good)
    with pytest.raises(StoreError, match=r"shard-000000.*'k1'.*missing field.*latent"):
        with st.open_shard_writer("shard-000000", SCHEMA) as w:
            w.write("k1", 1, "p", 0, {"noise": good["noise"]})
    with pytest.raises(StoreError, match=r"shard-000000.*'k2'.*'latent'.*dtype float32.*float16"):
        with st.open_shard_writer("shard-000000", SCHEMA) as w:
            w.write("k2", 2, "p", 0, {"noise": good["noise"], "latent": good["noise"]})
    with pytest.raises(StoreError, match=r"'k3'.*'noise'.*shape \[8, 8\].*\[4, 8, 8\]"):
        with st.open_shard_writer("shard-000000", SCHEMA) as w:
            w.write("k3", 3, "p", 0, {"noise": good["noise"][0], "latent": good["latent"]})
    # Nothing visible was left behind by the failed writers.
    assert st.shard_info("shard-000000") is None and st.complete_shards() == {}


def test_half_written_shard_is_invisible_and_overwritten(root_url):
    st = PairStore(root_url)
    st.ensure_fingerprint(FINGERPRINT)
    fs, path = fsspec.core.url_to_fs(root_url)
    # A crash after the tar landed but before its index: the tar alone means nothing.
    fs.makedirs(f"{path}/shards", exist_ok=True)
    fs.pipe_file(f"{path}/shards/shard-000000.tar", b"garbage from a crashed writer")
    assert st.shard_info("shard-000000") is None
    # A stale index whose tar does not match (e.g. tar rewritten, index from an older run).
    info = write_shard(st, 1, 3)
    fs.pipe_file(f"{path}/shards/shard-000001.tar", b"x" * 1024)
    assert st.shard_info("shard-000001") is None
    assert set(st.complete_shards()) == set()
    infos = [write_shard(st, 0, 3), write_shard(st, 1, 3)]
    assert infos[1] == info  # rewritten deterministically
    assert set(st.complete_shards()) == {"shard-000000", "shard-000001"}
    st.commit(infos, None)
    assert [st.get(index=i)["index"] for i in range(6)] == list(range(6))


def test_exception_inside_writer_leaves_nothing(root_url):
    st = PairStore(root_url)
    with pytest.raises(RuntimeError):
        with st.open_shard_writer("shard-000000", SCHEMA) as w:
            w.write("k0", 0, "p", 0, sample_arrays(0))
            raise RuntimeError("teacher crashed")
    assert w.info is None and st.shard_info("shard-000000") is None
    fs, path = fsspec.core.url_to_fs(root_url)
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/index/shard-000000.parquet")


def test_committed_shards_cannot_be_rewritten(root_url):
    st = make_dataset(root_url, shards=1, per_shard=2)
    with pytest.raises(StoreError, match="shard-000000 is part of a committed version"):
        write_shard(st, 0, 2)
    assert st.shard_info("shard-000000") == st.manifest().shards[0]
