"""The `store` console script, run for real in a subprocess (S3 reached through AWS_ENDPOINT_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from tests.helpers.store_data import make_dataset

STORE = str(Path(sys.executable).parent / "store")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORE, *args], capture_output=True, text=True, timeout=120, env=dict(os.environ))


def _flip_byte(url: str, shard: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    row = pq.read_table(fs.open(f"{path}/index/{shard}.parquet", "rb")).slice(1, 1).to_pylist()[0]
    p = f"{path}/shards/{shard}.tar"
    data = bytearray(fs.cat_file(p))
    data[row["latent_offset"] + 150] ^= 0x01
    fs.pipe_file(p, bytes(data))


def test_info_versions_head_json(root_url):
    st = make_dataset(root_url, shards=2, per_shard=3)
    st.commit(st.manifest().shards[:1], parent=1, extra={"why": "subset"})
    info = json.loads(run("info", f"{root_url}@v1", "--json").stdout)
    assert (info["version"], info["num_pairs"], info["num_shards"]) == (1, 6, 2)
    assert info["bytes"] == st.manifest(1).bytes and info["fingerprint"]["teacher"] == "tiny-sd15"
    versions = json.loads(run("versions", root_url, "--json").stdout)
    assert [(v["version"], v["parent"], v["num_pairs"]) for v in versions] == [(1, None, 6), (2, 1, 3)]
    head = json.loads(run("head", f"{root_url}@v1", "-n", "4", "--json").stdout)
    assert [r["index"] for r in head] == [0, 1, 2, 3] and head[3]["shard"] == "shard-000001"
    assert head[1]["prompt"] == "prompt number 1"


def test_verify_names_exactly_the_corrupted_shard(root_url):
    make_dataset(root_url, shards=3, per_shard=3)
    ok = run("verify", root_url, "--deep")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    _flip_byte(root_url, "shard-000001")
    bad = run("verify", root_url)
    assert bad.returncode == 1
    assert "BAD shard-000001: tar xxh3" in bad.stdout
    assert "shard-000000" not in bad.stdout and "shard-000002" not in bad.stdout
    assert "FAILED: 1 bad shard(s)" in bad.stdout.splitlines()[-1]


def test_verify_reports_missing_and_truncated(root_url):
    make_dataset(root_url, shards=3, per_shard=2)
    fs, path = fsspec.core.url_to_fs(root_url)
    fs.rm(f"{path}/index/shard-000000.parquet")
    tar = f"{path}/shards/shard-000002.tar"
    fs.pipe_file(tar, fs.cat_file(tar)[:-1500])
    out = run("verify", root_url, "--json")
    assert out.returncode == 1
    bad = {b["shard"]: b["reason"] for b in json.loads(out.stdout)["bad"]}
    assert set(bad) == {"shard-000000", "shard-000002"}
    assert "index file missing" in bad["shard-000000"] and "truncated" in bad["shard-000002"]


def test_errors_are_one_line_with_exit_2(root_url):
    make_dataset(root_url, shards=1, per_shard=1)
    out = run("info", f"{root_url}@v5")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"store: error: {root_url}@v5: no such version; existing versions: v1"]
    missing = run("verify", root_url + "-missing")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "no committed versions" in missing.stderr


def test_unreachable_endpoint_is_one_line():
    # AWS_MAX_ATTEMPTS=1: botocore's retries with back-off would only make the same error take 11 s.
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_MAX_ATTEMPTS": "1"}
    out = subprocess.run([STORE, "info", "s3://no-bucket/pairs"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Could not connect to the endpoint" in lines[0]
