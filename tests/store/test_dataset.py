"""PairDataset / PairLoader: deterministic order, equal per-rank counts, exact mid-epoch resume
with 0/1/2 DataLoader workers and 2 simulated ranks, corruption handling."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from store import CorruptShardError, PairDataset, PairLoader, StoreError
from tests.helpers.store_data import make_dataset, sample_arrays

N = 21  # 3 shards x 7: deliberately not a multiple of batch sizes, ranks or blocks


@pytest.fixture
def dataset_url(root_url):
    make_dataset(root_url, shards=3, per_shard=7)
    return root_url


def _indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_samples_decode_to_stored_dtypes(dataset_url):
    fields = ("noise", "latent", "prompt", "seed")
    ds = PairDataset(dataset_url + "@v1", fields=fields, shuffle_block=4)
    seen = []
    for s in ds:
        assert set(s) == {*fields, "index", "key"}  # no bookkeeping keys in what the user sees
        ref = sample_arrays(s["index"])
        assert s["noise"].dtype == torch.float32 and s["latent"].dtype == torch.float16
        assert torch.equal(s["noise"], torch.from_numpy(ref["noise"]))
        assert s["prompt"] == f"prompt number {s['index']}" and s["seed"] == 7 * s["index"]
        seen.append(s["index"])
    assert sorted(seen) == list(range(N))
    assert ds.epoch == 1 and ds.state_dict()["consumed"] == []
    # The loader's view of the same pass: each sample tagged with its position, in order.
    tagged = list(PairDataset(dataset_url + "@v1", fields=fields, shuffle_block=4).iter_tagged())
    assert [t.position for t in tagged] == list(range(N)) and [t.sample["index"] for t in tagged] == seen
    assert all(t.worker == 0 and t.skipped == () and set(t.sample) == {*fields, "index", "key"} for t in tagged)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_hold_only_user_fields(dataset_url, workers):
    ds = PairDataset(dataset_url, fields=("latent", "prompt"), shuffle_block=4)
    batch = next(iter(PairLoader(ds, batch_size=3, num_workers=workers)))
    assert set(batch) == {"latent", "prompt", "index", "key"} and batch["latent"].shape[0] == 3
    custom = PairLoader(PairDataset(dataset_url, fields=("prompt",), shuffle_block=4), batch_size=4,
                        num_workers=workers, collate_fn=lambda samples: [sorted(s) for s in samples])
    got = [keys for batch in custom for keys in batch]
    assert len(got) == N and all(keys == ["index", "key", "prompt"] for keys in got)
    single = PairLoader(PairDataset(dataset_url, fields=("prompt",), shuffle=False), batch_size=None,
                        num_workers=workers)
    assert sorted(s["index"] for s in single) == list(range(N)) and single.pair_dataset.epoch == 1
    assert single.dataset.state_dict()["epoch"] == 1  # `dataset` still answers as the PairDataset


def test_order_is_deterministic_per_seed_and_epoch(dataset_url):
    a = [s["index"] for s in PairDataset(dataset_url, fields=("prompt",), shuffle_block=5, seed=3)]
    b = [s["index"] for s in PairDataset(dataset_url, fields=("prompt",), shuffle_block=5, seed=3)]
    c = [s["index"] for s in PairDataset(dataset_url, fields=("prompt",), shuffle_block=5, seed=4)]
    ds = PairDataset(dataset_url, fields=("prompt",), shuffle_block=5, seed=3)
    ds.set_epoch(1)
    d = [s["index"] for s in ds]
    assert a == b and a != c and a != d and sorted(d) == list(range(N))
    plain = [s["index"] for s in PairDataset(dataset_url, fields=("prompt",), shuffle=False)]
    assert plain == list(range(N))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_mid_epoch_resume_yields_exactly_the_rest(dataset_url, workers):
    ds = PairDataset(dataset_url, shuffle_block=5, seed=1)
    it = iter(PairLoader(ds, batch_size=2, num_workers=workers))
    first = [i for _ in range(4) for i in next(it)["index"].tolist()]
    state = ds.state_dict()
    del it
    assert state["num_consumed"] == 8 and state["epoch"] == 0

    # Resume with the same worker count (order identical to an uninterrupted run) ...
    same = PairDataset(dataset_url, shuffle_block=5, seed=1)
    same.load_state_dict(state)
    rest = _indices(PairLoader(same, batch_size=2, num_workers=workers))
    uninterrupted = _indices(PairLoader(PairDataset(dataset_url, shuffle_block=5, seed=1), batch_size=2, num_workers=workers))
    assert first + rest == uninterrupted
    assert same.epoch == 1 and same.state_dict()["consumed"] == []

    # ... and with a different one (same set of remaining samples).
    other = PairDataset(dataset_url, shuffle_block=5, seed=1)
    other.load_state_dict(state)
    rest2 = _indices(PairLoader(other, batch_size=3, num_workers=2 - workers % 2))
    assert sorted(rest2) == sorted(rest) and sorted(first + rest2) == list(range(N))


def test_resume_twice_without_loader(dataset_url):
    ds = PairDataset(dataset_url, fields=("latent",), shuffle_block=4)
    order = []
    for _ in range(3):  # interrupt after 5 samples, three times
        it = iter(ds)
        order += [next(it)["index"] for _ in range(5)]
        state = ds.state_dict()
        ds = PairDataset(dataset_url, fields=("latent",), shuffle_block=4)
        ds.load_state_dict(state)
    order += [s["index"] for s in ds]
    assert order == [s["index"] for s in PairDataset(dataset_url, fields=("latent",), shuffle_block=4)]


def test_two_ranks_get_equal_counts_and_resume(dataset_url):
    def rank_ds(r):
        return PairDataset(dataset_url, fields=("prompt",), shuffle_block=4, rank=r, world_size=2)

    full = {r: _indices(PairLoader(rank_ds(r), batch_size=2, num_workers=1)) for r in (0, 1)}
    assert len(full[0]) == len(full[1]) == 11 == len(rank_ds(0))  # ceil(21 / 2), one padded sample
    assert set(full[0]) | set(full[1]) == set(range(N))
    assert len(full[0]) + len(full[1]) - len(set(full[0]) | set(full[1])) == 1

    for r in (0, 1):
        ds = rank_ds(r)
        it = iter(PairLoader(ds, batch_size=2, num_workers=2))
        first = next(it)["index"].tolist() + next(it)["index"].tolist()
        state = ds.state_dict()
        del it
        resumed = rank_ds(r)
        resumed.load_state_dict(state)
        assert sorted(first + _indices(PairLoader(resumed, batch_size=2, num_workers=1))) == sorted(full[r])
        with pytest.raises(StoreError, match="world_size: saved 2 vs now 3"):
            PairDataset(dataset_url, rank=r, world_size=3).load_state_dict(state)

    unpadded = PairDataset(dataset_url, fields=("prompt",), rank=1, world_size=2, pad=False)
    assert len(list(unpadded)) == 10


def _corrupt_tar(url: str, shard: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    p = f"{path}/shards/{shard}.tar"
    row = pq.read_table(fs.open(f"{path}/index/{shard}.parquet", "rb")).slice(0, 1).to_pylist()[0]
    data = bytearray(fs.cat_file(p))
    data[row["noise_offset"] + 200] ^= 0xFF  # inside the first sample's noise payload
    fs.pipe_file(p, bytes(data))


def test_corrupt_shard_raises_naming_it(dataset_url):
    _corrupt_tar(dataset_url, "shard-000001")
    with pytest.raises(CorruptShardError, match=r"shard-000001 \(.*shard-000001\.tar\).*xxh3 mismatch"):
        list(PairDataset(dataset_url, shuffle=False))


def test_corrupt_shard_skipped_and_counted(dataset_url):
    _corrupt_tar(dataset_url, "shard-000001")
    ds = PairDataset(dataset_url, shuffle_block=4, on_corrupt="skip")
    got = [s["index"] for s in ds]
    # The flipped byte is in sample 7's noise: that sample fails its hash and is skipped.
    assert sorted(got) == [i for i in range(N) if i != 7]
    assert ds.skipped == {"shard-000001": 1} and ds.stats()["skipped"] == {"shard-000001": 1}
    ds2 = PairDataset(dataset_url, shuffle_block=4, on_corrupt="skip")
    got2 = _indices(PairLoader(ds2, batch_size=2, num_workers=2))
    assert sorted(got2) == sorted(got) and ds2.state_dict()["skipped"] == {"shard-000001": 1}


def test_skip_at_the_very_end_of_a_worker_is_still_counted(dataset_url):
    fs, path = fsspec.core.url_to_fs(dataset_url)
    row = pq.read_table(fs.open(f"{path}/index/shard-000002.parquet", "rb")).to_pylist()[-1]
    tar = f"{path}/shards/shard-000002.tar"
    data = bytearray(fs.cat_file(tar))
    data[row["latent_offset"] + 200] ^= 0xFF  # sample 20: the last position of worker 1's span
    fs.pipe_file(tar, bytes(data))
    # shuffle_block=1: the last chunk holds only the bad sample, so no later sample can carry the news.
    ds = PairDataset(dataset_url, shuffle=False, shuffle_block=1, on_corrupt="skip")
    assert sorted(_indices(PairLoader(ds, batch_size=2, num_workers=2))) == list(range(20))
    assert ds.skipped == {"shard-000002": 1} and ds.epoch == 1


def test_unreadable_shard_skipped_whole(dataset_url):
    fs, path = fsspec.core.url_to_fs(dataset_url)
    fs.rm(f"{path}/shards/shard-000002.tar")
    ds = PairDataset(dataset_url, shuffle_block=4, on_corrupt="skip")
    assert sorted(s["index"] for s in ds) == list(range(14))
    assert ds.skipped == {"shard-000002": 7}


def test_missing_shard_raises(dataset_url):
    fs, path = fsspec.core.url_to_fs(dataset_url)
    fs.rm(f"{path}/shards/shard-000002.tar")
    with pytest.raises(CorruptShardError, match="shard-000002.*tar file missing"):
        list(PairDataset(dataset_url, shuffle=False))


def test_bad_arguments_are_named(dataset_url):
    with pytest.raises(StoreError, match=r"unknown field\(s\) \['pixels'\]"):
        PairDataset(dataset_url, fields=("pixels",))
    with pytest.raises(StoreError, match="on_corrupt"):
        PairDataset(dataset_url, on_corrupt="ignore")
    with pytest.raises(StoreError, match="existing versions: v1"):
        PairDataset(dataset_url + "@v4")


def _ddp_rank(rank: int, url: str, tmp: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        ds = PairDataset(url, fields=("prompt",), shuffle_block=4)  # rank/world from the process group
        # A spawned worker has no process group (a forked one inherits it): rank must come along.
        got = _indices(PairLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn"))
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"indices": got, "state": ds.state_dict()}, f)
    finally:
        dist.destroy_process_group()


def test_real_process_group_ranks(dataset_url, tmp_path):
    import json
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ddp_rank, args=(r, dataset_url, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["state"]["rank"] for o in out] == [0, 1] and out[0]["state"]["world_size"] == 2
    assert len(out[0]["indices"]) == len(out[1]["indices"]) == 11
    assert set(out[0]["indices"]) | set(out[1]["indices"]) == set(range(N))


def test_elastic_resume_on_a_different_number_of_ranks(dataset_url):
    import json

    def rank_ds(r, world):
        return PairDataset(dataset_url, fields=("prompt",), shuffle_block=4, rank=r, world_size=world)

    states, delivered = [], []
    for r in (0, 1):
        ds = rank_ds(r, 2)
        it = iter(PairLoader(ds, batch_size=2, num_workers=1))
        delivered += next(it)["index"].tolist() + next(it)["index"].tolist()
        states.append(ds.state_dict())
        del it
    with pytest.raises(StoreError, match="one state per rank"):
        PairDataset.merge_states(states[:1])
    merged = json.loads(json.dumps(PairDataset.merge_states(states)))  # survives a checkpoint

    got = {}
    for r in range(3):
        ds = rank_ds(r, 3)
        ds.load_state_dict(merged)
        got[r] = _indices(PairLoader(ds, batch_size=2, num_workers=2 if r == 0 else 0))
        assert ds.epoch == 1 and ds.state_dict()["base"] is None
    remaining = set(range(N)) - set(delivered)
    assert len(delivered) == 8 and [len(got[r]) for r in range(3)] == [5, 5, 5]  # ceil(13 / 3), padded
    assert set(got[0]) | set(got[1]) | set(got[2]) == remaining


def _global_ds(url, rank, world, big=6, **kw):
    return PairDataset(url, fields=("prompt",), shuffle_block=4, rank=rank, world_size=world, global_batch=big, **kw)


def _global_steps(url, world, big=6, state=None, steps=None):
    """Per global step, the union of every rank's samples in rank order (each rank reads its slice of
    big // world positions per step); `state`: a merged state every rank loads first."""
    per_rank = []
    for r in range(world):
        ds = _global_ds(url, r, world, big)
        if state is not None:
            ds.load_state_dict(state)
        idx = _indices(PairLoader(ds, batch_size=big // world, num_workers=0))
        per_rank.append([idx[i: i + big // world] for i in range(0, len(idx), big // world)])
    assert len({len(s) for s in per_rank}) == 1  # equal counts on every rank
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(len(per_rank[0]))][:steps]


def test_global_batches_are_the_same_for_any_number_of_ranks(dataset_url):
    one, two, three = (_global_steps(dataset_url, w) for w in (1, 2, 3))
    assert one == two == three and len(one) == 4  # ceil(21 / 6): the last global batch padded
    assert set(sum(one, [])) == set(range(N)) and len(_global_ds(dataset_url, 1, 3)) == 8
    with pytest.raises(StoreError, match="global_batch 6 cannot be split evenly between 4 ranks"):
        len(_global_ds(dataset_url, 0, 4))
    unpadded = _global_ds(dataset_url, 1, 2, pad=False)
    assert len(unpadded) == 9  # 21 // 6 global batches of 3 per rank


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (3, 2)])
def test_elastic_resume_continues_with_the_same_global_batches(dataset_url, before, after):
    import json

    reference = _global_steps(dataset_url, 1)
    states = []
    for r in range(before):  # each rank reads its slices of the first global batch, then stops
        ds = _global_ds(dataset_url, r, before)
        it = iter(PairLoader(ds, batch_size=6 // before, num_workers=0))
        got = next(it)["index"].tolist()
        assert got == reference[0][r * 6 // before: (r + 1) * 6 // before]
        states.append(ds.state_dict())
        del it
    merged = json.loads(json.dumps(PairDataset.merge_states(states)))
    assert merged["global_batches_done"] == 1
    assert _global_steps(dataset_url, after, state=merged) == reference[1:]
    # A state saved after the elastic resume is a plain state of the new layout.
    ds = _global_ds(dataset_url, 0, after)
    ds.load_state_dict(merged)
    assert ds.state_dict()["consumed"] == [[0, 6 // after]]


def test_merge_of_unaligned_global_batch_states_still_reads_every_sample_once(dataset_url):
    states, delivered = [], []
    for r, batches in ((0, 2), (1, 1)):  # not a step boundary: rank 0 is one batch ahead
        ds = _global_ds(dataset_url, r, 2)
        it = iter(PairLoader(ds, batch_size=3, num_workers=0))
        delivered += [i for _ in range(batches) for i in next(it)["index"].tolist()]
        states.append(ds.state_dict())
        del it
    merged = PairDataset.merge_states(states)
    assert merged["global_batches_done"] == 0 and merged["base"] is not None
    rest = sum(_global_steps(dataset_url, 2, state=merged), [])
    assert set(rest) == set(range(N)) - set(delivered) and len(rest) == 12  # 21 - 9: two whole global batches
