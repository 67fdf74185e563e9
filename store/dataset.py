"""PairDataset: a streaming torch IterableDataset over `URL[@vN]` with deterministic shuffling,
equal per-rank counts, background read-ahead and exact mid-epoch resume (see docs/FORMAT.md)."""

from __future__ import annotations

from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import xxhash
from torch.utils.data import IterableDataset, get_worker_info

from .errors import CorruptShardError, StoreError
from .order import Base, EpochOrder, IntervalSet, rank_range, split_by_count
from .pairstore import PairStore
from .reading import META_FIELDS, Decoder, ShardIndex, array_members, decode_rows, fetch_range, hash_failures
from .url import parse_url

STATE_FORMAT = 1


class PairDataset(IterableDataset):
    def __init__(
        self,
        url: str,
        fields=("noise", "latent", "prompt"),
        shuffle: bool = True,
        seed: int = 0,
        shuffle_block: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        pad: bool = True,
        read_ahead: int = 2,
        on_corrupt: str = "raise",
        verify_hashes: bool = True,
        storage_options: dict | None = None,
    ):
        root, version = parse_url(url)
        if on_corrupt not in ("raise", "skip"):
            raise StoreError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if shuffle_block < 1:
            raise StoreError(f"shuffle_block must be >= 1, got {shuffle_block}")
        self.store = PairStore(root, storage_options)
        # Pin the version now so 'latest' cannot move between epochs or between ranks' workers.
        self.manifest = self.store.manifest(version)
        self.version = self.manifest.version
        self.fields = list(fields)
        schema = self.manifest.schema
        unknown = [f for f in self.fields if f not in schema.fields and f not in META_FIELDS]
        if unknown:
            raise StoreError(
                f"unknown field(s) {unknown} for {root}@v{self.version}; available: {schema.names + list(META_FIELDS)}"
            )
        self.shuffle, self.seed, self.shuffle_block = bool(shuffle), int(seed), int(shuffle_block)
        self._rank_arg, self._world_arg = rank, world_size
        self._freeze_dist()
        self.pad = bool(pad)
        self.read_ahead = max(0, int(read_ahead))
        self.on_corrupt = on_corrupt
        self.verify_hashes = bool(verify_hashes)
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self._consumed = IntervalSet()
        self._spans: list[list[tuple[int, int]]] | None = None
        self._next_worker = 0
        self._driven = False
        # Epoch positions this epoch still covers (None: all). Set only by an elastic resume.
        self._base: list[tuple[int, int]] | None = None

    # -- ranks --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.manifest.num_pairs

    @property
    def rank(self) -> int:
        return self._dist()[0]

    @property
    def world_size(self) -> int:
        return self._dist()[1]

    def _freeze_dist(self) -> None:
        # DataLoader worker processes have no process group: pin rank/world while we are in the
        # main process (at construction if torch.distributed is up, else when planning an epoch).
        import torch.distributed as dist

        if get_worker_info() is None and dist.is_available() and dist.is_initialized():
            self._rank_arg, self._world_arg = self._dist()

    def _dist(self) -> tuple[int, int]:
        rank, world = self._rank_arg, self._world_arg
        if rank is None or world is None:
            import torch.distributed as dist

            live = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if live else 0)
            world = world if world is not None else (dist.get_world_size() if live else 1)
        if not 0 <= rank < world:
            raise StoreError(f"rank {rank} is outside world_size {world}")
        return rank, world

    def _base_obj(self) -> Base:
        return Base.full(self.num_samples) if self._base is None else Base(self._base)

    def _rank_range(self) -> tuple[int, int]:
        rank, world = self._dist()
        return rank_range(self._base_obj().size, world, rank, self.pad)

    def __len__(self) -> int:
        a, b = self._rank_range()
        return b - a

    # -- state --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._consumed = IntervalSet()
        self._spans = None
        self._next_worker = 0
        self._base = None

    def _complete_epoch(self, epoch: int) -> None:
        if self.epoch == epoch:  # idempotent: loader and dataset may both report the same end
            self.set_epoch(epoch + 1)

    def _record(self, positions, worker: int | None = None, num_workers: int = 1, skipped=()) -> None:
        self._consumed.add_positions(positions)
        for shard, pos in skipped:
            self._consumed.add_positions(pos)
            self.skipped[shard] = self.skipped.get(shard, 0) + len(pos)
        if worker is not None:
            self._next_worker = (worker + 1) % max(1, num_workers)

    def _account_unreported(self) -> None:
        """After a full pass through a loader, positions never delivered were skipped in a worker
        that had no later sample to report them on: count them against their shards."""
        a, b = self._rank_range()
        missing = self._consumed.subtract_from(a, b)
        if not missing:
            return
        order = EpochOrder([s.num_samples for s in self.manifest.shards], self.seed, self.epoch, self.shuffle, self.shuffle_block)
        for q, p, n in order.chunks(missing, self._base_obj()):
            shard_ids, _ = order.locate(order.list_indices(p, n))
            for j, sid in enumerate(shard_ids.tolist()):
                self._record([], skipped=[(self.manifest.shards[sid].name, [q + j])])

    def state_dict(self) -> dict:
        rank, world = self._dist()
        return {
            "format": STATE_FORMAT,
            "version": self.version,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_block": self.shuffle_block,
            "num_samples": self.num_samples,
            "rank": rank,
            "world_size": world,
            "pad": self.pad,
            "consumed": self._consumed.to_list(),
            "num_consumed": len(self._consumed),
            "spans": None if self._spans is None else [[list(iv) for iv in s] for s in self._spans],
            "next_worker": self._next_worker,
            "skipped": dict(self.skipped),
            "base": None if self._base is None else [list(iv) for iv in self._base],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise StoreError(f"unsupported PairDataset state format {state.get('format')!r} (expected {STATE_FORMAT})")
        mine = self.state_dict()
        merged = state.get("world_size") is None  # from merge_states: any rank layout may load it
        keys = ("version", "seed", "shuffle", "shuffle_block", "num_samples", "pad")
        keys += () if merged else ("rank", "world_size")
        bad = [f"{k}: saved {state.get(k)!r} vs now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if bad:
            raise StoreError(
                "PairDataset state does not belong to this dataset/rank setup (exact resume needs the same "
                "version, seed, shuffle settings and ranks): " + "; ".join(bad)
            )
        self.epoch = int(state["epoch"])
        self._consumed = IntervalSet(state["consumed"])
        spans = state.get("spans")
        self._spans = None if spans is None else [[tuple(iv) for iv in s] for s in spans]
        self._next_worker = int(state.get("next_worker", 0))
        self.skipped = dict(state.get("skipped", {}))
        base = state.get("base")
        self._base = None if base is None else [tuple(iv) for iv in base]

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every rank's state_dict() of the same step, loadable under any number of
        ranks (elastic resume): the samples no rank has delivered yet are re-split evenly."""
        if not states:
            raise StoreError("merge_states needs the state of every rank")
        first = states[0]
        keys = ("format", "version", "epoch", "seed", "shuffle", "shuffle_block", "num_samples", "world_size", "pad", "base")
        for st in states[1:]:
            bad = [k for k in keys if st.get(k) != first.get(k)]
            if bad:
                raise StoreError(f"merge_states: states disagree on {bad}; they must come from one step of one job")
        world = first["world_size"]
        ranks = sorted(st["rank"] for st in states)
        if world is None or ranks != list(range(world)):
            raise StoreError(f"merge_states needs exactly one state per rank 0..{world - 1 if world else '?'}, got ranks {ranks}")
        base = Base.full(first["num_samples"]) if first.get("base") is None else Base(first["base"])
        delivered = IntervalSet()
        skipped: dict[str, int] = {}
        for st in states:
            for a, b in base.epoch_positions([tuple(iv) for iv in st["consumed"]]):
                delivered.add(a, b)
            for shard, n in st.get("skipped", {}).items():
                skipped[shard] = skipped.get(shard, 0) + n
        remaining = IntervalSet()
        for a, b in base.intervals:
            for lo, hi in delivered.subtract_from(a, b):
                remaining.add(lo, hi)
        out = dict(first)
        out.update(rank=None, world_size=None, consumed=[], num_consumed=0, spans=None, next_worker=0,
                   skipped=skipped, base=remaining.to_list())
        return out

    # -- planning ------------------------------------------------------------------------------
    def _plan(self, num_workers: int) -> None:
        """Fix this iteration's per-worker spans (virtual positions). Called in the main process
        before workers are forked, so every worker sees the same plan."""
        self._freeze_dist()
        a, b = self._rank_range()
        if self._spans is not None and len(self._spans) == num_workers:
            # Same worker count: keep each worker's original span and start the round robin at
            # the worker that was due next, so the resumed order equals the uninterrupted one.
            k = self._next_worker % num_workers
            self._spans = self._spans[k:] + self._spans[:k]
        else:
            self._spans = split_by_count(self._consumed.subtract_from(a, b), num_workers)
        self._next_worker = 0

    def _worker_positions(self, worker: int) -> list[tuple[int, int]]:
        a, b = self._rank_range()
        remaining = IntervalSet(self._consumed.subtract_from(a, b))
        return remaining.intersect(self._spans[worker])

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        # direct: iterated by the user in this process, so we keep the resume state ourselves.
        direct = info is None and not self._driven
        if info is None:
            worker, num_workers = 0, 1
            if direct:
                self._plan(1)
        else:
            worker, num_workers = info.id, info.num_workers
            if self._spans is None or len(self._spans) != num_workers:
                self._plan(num_workers)  # plain DataLoader: identical state in every worker -> same plan
        epoch = self.epoch
        order = EpochOrder([s.num_samples for s in self.manifest.shards], self.seed, epoch, self.shuffle, self.shuffle_block)
        pending_skips: list = []
        for item in self._stream(order, self._worker_positions(worker), self._base_obj()):
            if item[0] == "skip":
                _, shard, positions = item
                if direct:
                    self._record([], skipped=[(shard, positions)])
                else:
                    pending_skips.append((shard, positions))
                continue
            sample = item[1]
            sample["_worker"] = worker
            if pending_skips:
                sample["_skipped"] = pending_skips
                pending_skips = []
            if direct:
                self._record([sample["_position"]])
            yield sample
        if direct:
            self._complete_epoch(epoch)

    def _stream(self, order: EpochOrder, intervals, base: Base):
        """Items for `intervals` in position order. Byte ranges are fetched on background threads
        `read_ahead` chunks ahead; index parsing and decoding stay on this thread (pyarrow driven
        from pool threads can abort the interpreter at exit when an iterator is abandoned)."""
        reader = _ChunkReader(self)
        chunks = order.chunks(intervals, base)
        if self.read_ahead == 0:
            for q, p, n in chunks:
                plan = reader.plan(order, q, p, n)
                yield from reader.finish(plan, reader.fetch(plan))
            return
        pool = ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="pair-read-ahead")
        window: deque = deque()

        def submit(plan: dict) -> list:
            # One task per shard range, so the threads share even the first chunk's reads (a
            # shuffle block spans several shards) instead of one thread reading it alone.
            return [pool.submit(reader.fetch_group, g) for g in plan["groups"]]

        try:
            for q, p, n in chunks:
                plan = reader.plan(order, q, p, n)
                window.append((plan, submit(plan)))
                if len(window) > self.read_ahead:
                    plan, futs = window.popleft()
                    yield from reader.finish(plan, [f.result() for f in futs])
            while window:
                plan, futs = window.popleft()
                yield from reader.finish(plan, [f.result() for f in futs])
        finally:
            for _, futs in window:
                for fut in futs:
                    fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        return {"epoch": self.epoch, "consumed": len(self._consumed), "skipped": dict(self.skipped)}


class _ChunkReader:
    """Reads one chunk of positions: one index load (cached) and one byte range per shard."""

    def __init__(self, ds: PairDataset):
        self.ds = ds
        self.store = ds.store
        self.fields = ds.fields
        self.members = array_members(ds.fields) + (["json"] if "json" in ds.fields else [])
        self.members = self.members or ["json"]
        self.decoder = Decoder(ds.manifest.schema)
        self.indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self.unreadable: set[str] = set()

    def _index(self, shard) -> ShardIndex:
        sidx = self.indexes.get(shard.name)
        if sidx is not None:
            self.indexes.move_to_end(shard.name)
            return sidx
        url = self.store.shard_url(shard.name)
        try:
            data = self.store.fs.cat_file(self.store._index_path(shard.name))
        except FileNotFoundError:
            raise CorruptShardError(shard.name, url, "index file missing") from None
        if len(data) != shard.index_bytes or (self.ds.verify_hashes and xxhash.xxh3_64_hexdigest(data) != shard.index_xxh3):
            raise CorruptShardError(shard.name, url, "index does not match the manifest's size/xxh3")
        try:
            sidx = ShardIndex.from_bytes(shard.name, data, f"{self.store.url}/index/{shard.name}.parquet")
        except StoreError as exc:
            raise CorruptShardError(shard.name, url, str(exc)) from exc
        if len(sidx) != shard.num_samples:
            raise CorruptShardError(shard.name, url, f"index has {len(sidx)} rows, manifest says {shard.num_samples}")
        self.indexes[shard.name] = sidx
        while len(self.indexes) > 16:
            self.indexes.popitem(last=False)
        return sidx

    def plan(self, order: EpochOrder, q: int, p: int, n: int) -> dict:
        """Which rows of which shards positions [q, q+n) need, with each shard's index loaded."""
        L = order.list_indices(p, n)
        shard_ids, rows = order.locate(L)
        by_shard: dict[int, list[int]] = {}
        for j, s in enumerate(shard_ids.tolist()):
            by_shard.setdefault(s, []).append(j)
        groups = []
        for s, js in by_shard.items():
            shard = self.ds.manifest.shards[s]
            url = self.store.shard_url(shard.name)
            shard_rows = [int(rows[j]) for j in js]
            try:
                if shard.name in self.unreadable:
                    raise CorruptShardError(shard.name, url, "unreadable (see the first error)")
                sidx = self._index(shard)
                start, end = sidx.byte_range(shard_rows, self.members)
                if end > shard.tar_bytes:
                    raise CorruptShardError(shard.name, url, "index points past the tar's end")
                groups.append({"shard": shard, "url": url, "js": js, "rows": shard_rows, "sidx": sidx, "range": (start, end)})
            except CorruptShardError as exc:
                groups.append({"shard": shard, "url": url, "js": js, "rows": shard_rows, "error": exc})
        return {"q": q, "n": n, "groups": groups}

    def fetch(self, plan: dict) -> list:
        """The planned byte ranges with their hash failures (or the error for each)."""
        return [self.fetch_group(g) for g in plan["groups"]]

    def fetch_group(self, group: dict):
        """One shard's byte range and its hash failures, or the error; I/O and hashing only, safe
        on a pool thread, so both overlap the consumer's decoding."""
        if "error" in group:
            return group["error"]
        try:
            start, end = group["range"]
            name = group["shard"].name
            buf = fetch_range(self.store.fs, self.store._tar_path(name), group["url"], name, start, end)
            failed = hash_failures(buf, start, group["sidx"], group["rows"], self.members) if self.ds.verify_hashes else None
            return buf, failed
        except CorruptShardError as exc:
            return exc

    def finish(self, plan: dict, bufs: list) -> list:
        """Items for the plan's positions: ("sample", dict) in position order, and ("skip", shard,
        positions) for what could not be read when on_corrupt="skip"."""
        q, n = plan["q"], plan["n"]
        samples: list = [None] * n
        skipped = []
        skip = self.ds.on_corrupt == "skip"
        for g, fetched in zip(plan["groups"], bufs, strict=True):
            shard, js = g["shard"], g["js"]
            bad: list | None = [] if skip else None
            try:
                if isinstance(fetched, CorruptShardError):
                    raise fetched
                buf, failed = fetched
                got = decode_rows(buf, g["range"][0], g["sidx"], g["rows"], self.fields, self.decoder, g["url"],
                                  failed, bad)
            except CorruptShardError:
                # The shard cannot be read at all (missing, truncated, bad index): skip all of it.
                if not skip:
                    raise
                self.unreadable.add(shard.name)
                skipped.append((shard.name, [q + j for j in js]))
                continue
            if bad:  # individual samples failed their hashes: skip just those
                skipped.append((shard.name, [q + js[k] for k, _ in bad]))
            for j, sample in zip(js, got, strict=True):
                if sample is not None:
                    sample["_position"] = q + j
                    samples[j] = sample
        out: list = [("skip", name, pos) for name, pos in skipped]
        out += [("sample", smp) for smp in samples if smp is not None]
        return out
