"""The store on S3 through a proxy that throttles (503 SlowDown), fails (500), resets connections
mid-body and delays 10% of the requests (tests/helpers/s3_faults.py): `store verify`, streaming
with PairDataset and PairLoader, and training checkpoints give exactly what a fault-free run
gives; writes whose response is lost are not mistaken for conflicts; retries are counted."""

from __future__ import annotations

import json
import os

import pytest
import s3fs
import torch

from distill.checkpoint import CheckpointStore
from store import PairDataset, PairLoader, PairStore, StorageUnavailableError, VersionConflict, layout
from store.atomic import StreamingUpload
from store.cli import main as store_main
from store.s3_retries import retried_requests
from tests.helpers.s3_faults import retry_bounds
from tests.helpers.store_data import FINGERPRINT, make_dataset, write_shard

RATE = 0.10
FIELDS = ("noise", "latent", "prompt", "json")


def _as_bytes(sample: dict) -> dict:
    return {k: (v.view(torch.uint8).numpy().tobytes() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def _stream(url: str, workers: int | None) -> list[dict]:
    """Every sample of one shuffled epoch, in delivery order, as bytes: through PairDataset's own
    iterator (workers None, two read-ahead threads) or a PairLoader with `workers` processes."""
    ds = PairDataset(url, fields=FIELDS, seed=7, shuffle_block=5, read_ahead=2)
    if workers is None:
        return [_as_bytes(s) for s in ds]
    loader = PairLoader(ds, batch_size=None, num_workers=workers)
    return [_as_bytes(s) for s in loader]


def test_verify_and_streaming_through_faults(s3_faults, s3_bucket, capsys):
    url = f"{s3_bucket}/pairs"
    make_dataset(url, shards=6, per_shard=4)
    clean = {workers: _stream(url, workers) for workers in (None, 2)}
    assert len(clean[None]) == len(clean[2]) == 24

    s3_faults.rate = RATE
    s3_faults.reset_counts()
    before = retried_requests()
    assert _stream(url, None) == clean[None], "same samples, same bytes, same order"
    low, high = retry_bounds(s3_faults)
    assert low <= retried_requests() - before <= high, s3_faults.log
    faults = s3_faults.faults()
    # Worker processes count their own retries (per process): only the samples are compared.
    s3_faults.reset_counts()
    assert _stream(url, 2) == clean[2], "and through DataLoader worker processes"
    faults += s3_faults.faults()

    s3_faults.reset_counts()
    capsys.readouterr()
    assert store_main(["verify", url, "--deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["num_pairs"] == 24
    low, high = retry_bounds(s3_faults)
    assert low <= report["s3_retries"] <= high, s3_faults.log
    faults += s3_faults.faults()
    # The faults depend only on the requests (see s3_faults), so this count is the same every run.
    assert faults >= 4, f"too few faults to mean anything: {faults}"


def test_text_summary_names_the_retries(s3_faults, s3_bucket, capsys):
    url = f"{s3_bucket}/pairs"
    make_dataset(url, shards=1, per_shard=2)
    s3_faults.inject_once("throttle", "GET", "index/")
    capsys.readouterr()
    assert store_main(["verify", url]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"{url}@v1: 1 shards, 2 pairs checked, 1 S3 requests retried: OK"


def test_a_lost_response_to_an_exclusive_create_is_not_a_conflict(s3_faults, s3_bucket):
    """The fingerprint and each manifest are created with If-None-Match. When the create succeeds
    but its response is lost, the client re-sends it and S3 answers 412: the store must see its
    own file there, not another writer's (it used to raise VersionConflict for its own commit)."""
    url = f"{s3_bucket}/pairs"
    st = PairStore(url)
    s3_faults.inject_once("reset", "PUT", layout.FINGERPRINT_FILE)
    st.ensure_fingerprint(FINGERPRINT)
    info = write_shard(st, 0, 3)
    s3_faults.inject_once("reset", "PUT", layout.manifest_file(1))
    assert st.commit([info], None).version == 1
    assert s3_faults.injected["reset"] == 2, "both responses were lost"
    assert PairStore(url).manifest(1).shards == (info,)
    with pytest.raises(VersionConflict):  # a version that was there before is still a conflict
        PairStore(url).commit([info], None)


def test_a_lost_response_to_a_multipart_upload_step(s3_faults, s3_bucket):
    """Shard tars larger than a block go up in parts: a failed create, a part whose response is
    lost, and a completion whose response is lost (S3 answers a repeated completion as a success)
    leave exactly the bytes written."""
    st = PairStore(f"{s3_bucket}/pairs", storage_options={"default_block_size": 5 << 20})
    data = os.urandom(11 << 20)  # three parts
    path = f"{st.root}/big.bin"
    s3_faults.inject_once("throttle", "POST", "?uploads")
    s3_faults.inject_once("reset", "PUT", "partNumber=2")
    s3_faults.inject_once("reset", "POST", "uploadId=")
    upload = StreamingUpload(st.fs, path)
    for i in range(0, len(data), 1 << 20):
        upload.write(data[i : i + (1 << 20)])
    upload.commit()
    assert dict(s3_faults.injected) == {"throttle": 1, "reset": 2}
    assert st.fs.cat_file(path) == data


def test_storage_that_keeps_failing_is_not_corrupt_data(s3_faults, s3_bucket, monkeypatch, capsys):
    """When a request fails through every retry, readers stop with StorageUnavailableError naming
    the file. They used to call the shard corrupt or damaged: PairDataset(on_corrupt="skip")
    dropped its samples for the rest of the epoch, `store verify` sent the user to regenerate
    it, and pairgen refused to run on "damaged" committed shards."""
    url = f"{s3_bucket}/pairs"
    make_dataset(url, shards=2, per_shard=3)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no botocore retries: one 500 is the last word
    s3fs.S3FileSystem.clear_instance_cache()  # clients read AWS_MAX_ATTEMPTS when they are made

    s3_faults.inject_once("error", "GET", "shards/shard-000001.tar")
    ds = PairDataset(url, fields=("latent",), shuffle=False, on_corrupt="skip", read_ahead=0)
    with pytest.raises(StorageUnavailableError, match=r"reading shard shard-000001 \(s3://.*shard-000001.tar\)"):
        list(ds)
    assert ds.skipped == {}

    s3_faults.inject_once("error", "GET", "shards/shard-000000.tar")
    capsys.readouterr()
    assert store_main(["verify", url]) == 2
    out = capsys.readouterr()
    assert "BAD" not in out.out and "shard-000000" in out.err and "run the command again" in out.err

    s3_faults.inject_once("error", "GET", "index/shard-000000.parquet")
    with pytest.raises(StorageUnavailableError, match="index of shard shard-000000"):
        PairStore(url).damaged_shards()
    assert PairStore(url).damaged_shards() == [], "and nothing is damaged"


def _weights(step: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return {"generator": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).half()},
            "ema": {"w": torch.randn(64, 32, generator=g)}}


def test_checkpoints_through_faults(s3_faults, s3_bucket, tmp_path):
    clean = CheckpointStore(str(tmp_path / "run"))
    faulty = CheckpointStore(f"{s3_bucket}/run")
    s3_faults.rate = RATE
    s3_faults.reset_counts()
    before = retried_requests()
    for step in (10, 20, 30):
        for store in (clean, faulty):
            store.save(step, _weights(step), {"opt": {"lr": 0.1, "state": torch.arange(5)}}, {"step": step})
    faulty.prune(2)
    clean.prune(2)
    assert faulty.complete_steps() == clean.complete_steps() == [20, 30]
    for step in (20, 30):
        got, want = faulty.load(step, ["generator", "ema"]), clean.load(step, ["generator", "ema"])
        for name in ("generator", "ema"):
            assert got[0][name].keys() == want[0][name].keys()
            assert all(torch.equal(got[0][name][k], want[0][name][k]) for k in want[0][name])
            assert got[0][name]["w"].dtype == want[0][name]["w"].dtype
        assert torch.equal(got[1]["opt"]["state"], want[1]["opt"]["state"]) and got[2] == want[2] == {"step": step}
    low, high = retry_bounds(s3_faults)
    assert low <= retried_requests() - before <= high, dict(s3_faults.injected)
    assert s3_faults.faults() >= 3, f"too few faults to mean anything: {dict(s3_faults.injected)}"
