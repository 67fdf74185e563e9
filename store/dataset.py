"""PairDataset: a streaming torch IterableDataset over `URL[@vN]` with deterministic shuffling,
equal per-rank counts, background read-ahead and exact mid-epoch resume (docs/FORMAT.md, section 6).

Iterating a PairDataset yields plain sample dicts and keeps the resume state itself. PairLoader
drives it through the loader methods instead (plan_workers, iter_tagged, record_delivered,
finish_pass): there each sample travels in a TaggedSample that carries its position beside the
dict, and the main process records what reached the caller.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import xxhash
from torch.utils.data import IterableDataset, get_worker_info

from . import layout
from .errors import CorruptShardError, StoreError, transient_as_unavailable
from .manifest import ShardInfo
from .order import Base, EpochOrder, IntervalSet, global_batches, interleaved_runs, rank_range, split_by_count
from .pairstore import PairStore
from .reading import Decoder, ShardIndex, decode_rows, fetch_range, fetched_members, hash_failures
from .schema import LATENT, META_FIELDS, NOISE, PROMPT
from .url import parse_url

STATE_FORMAT = 1


@dataclass(frozen=True)
class SkippedRun:
    """Positions of one shard that could not be read and were skipped (on_corrupt="skip").

    Attributes:
        shard: the shard name, the key they are counted under in `PairDataset.skipped`.
        positions: their virtual positions.
    """

    shard: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class TaggedSample:
    """One sample and the bookkeeping exact resume needs, kept beside the sample, not in it.

    Attributes:
        sample: the dict the caller sees.
        position: the sample's virtual position in this rank's epoch.
        worker: the DataLoader worker that read it (0 when read in the calling process).
        skipped: what this worker skipped since its previous sample; it travels with the next
            sample so the main process learns of it in order (a skip that no later sample of its
            worker carries is settled by PairDataset.finish_pass).
    """

    sample: dict
    position: int
    worker: int
    skipped: tuple[SkippedRun, ...] = ()


class PairDataset(IterableDataset):
    """Samples of one pinned version of a pair store, in a deterministic order, with exact resume.

    Each sample is a dict: the requested fields (arrays as torch tensors in their stored dtype,
    `prompt` a str, `seed` an int, `json` the raw record) plus `index` and `key`.

    Attributes:
        store: the PairStore of the root.
        manifest: the pinned version's manifest; `version` is its number.
        fields: the requested fields.
        epoch: the current epoch; a full pass (or set_epoch) moves it on.
        skipped: shard name -> samples skipped in it so far (on_corrupt="skip").
    """

    def __init__(
        self,
        url: str,
        fields=(NOISE, LATENT, PROMPT),
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
        global_batch: int | None = None,
    ):
        """Open `url` and pin its version; only the manifest is read.

        Args:
            url: `ROOT@vN`, or `ROOT` for the latest version at construction (it stays pinned
                across epochs and DataLoader workers).
            fields: the fields each sample holds: array fields of the schema and/or "prompt",
                "seed", "json" (the raw json record).
            shuffle: permute the shards and shuffle samples within blocks, anew each epoch; False
                reads the shards in manifest order and their samples in index order.
            seed: the shuffle seed; (seed, epoch) fixes the order.
            shuffle_block: samples are shuffled within consecutive blocks of this many positions;
                memory is about (read_ahead + 1) blocks whatever the dataset size.
            rank: this process's rank; default torch.distributed's when initialised, else 0.
            world_size: the number of ranks; default torch.distributed's when initialised, else 1.
            pad: with several ranks, every rank gets ceil(N / world_size) samples, positions past
                the end wrapping to the start (True), or N // world_size, dropping the tail (False).
            read_ahead: chunks fetched ahead on background threads; 0 reads synchronously.
            on_corrupt: "raise" a CorruptShardError naming the shard, or "skip" what cannot be read
                and count it in `skipped`.
            verify_hashes: check every member read (and every index) against its recorded xxh3.
            storage_options: fsspec options for the root's filesystem.
            global_batch: None (default): each rank reads one contiguous range of the epoch.
                G: the epoch is cut into consecutive global batches of G positions and rank r
                of w reads the r-th slice of G / w positions of each (w must divide G), so the
                samples of global batch k are the same for every number of ranks, and a state
                merged with merge_states() resumes at the next global batch under any w dividing
                G (elastic training). The epoch is padded (pad=True) or cut (pad=False) to whole
                global batches. Global batch k holds positions [kG, (k+1)G) only while ranks read
                their slices in order: one DataLoader worker or none.
        """
        root, version = parse_url(url)
        if on_corrupt not in ("raise", "skip"):
            raise StoreError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if shuffle_block < 1:
            raise StoreError(f"shuffle_block must be >= 1, got {shuffle_block}")
        if global_batch is not None and int(global_batch) < 1:
            raise StoreError(f"global_batch must be >= 1 (or None), got {global_batch}")
        self.global_batch = None if global_batch is None else int(global_batch)
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
        # Epoch positions this epoch still covers (None: all). Set only by an elastic resume.
        self._base: list[tuple[int, int]] | None = None

    # -- ranks --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """The number of samples in the pinned version (all ranks together)."""
        return self.manifest.num_pairs

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._dist()[0]

    @property
    def world_size(self) -> int:
        """The number of ranks the samples are split between."""
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
        """This rank's positions [start, end): virtual positions in the contiguous mode; in the
        global-batch mode local positions j, which _to_virtual maps to the rank's slices."""
        rank, world = self._dist()
        if self.global_batch is None:
            return rank_range(self._base_obj().size, world, rank, self.pad)
        return 0, global_batches(self._base_obj().size, self.global_batch, self.pad) * self._slice_size(world)

    def _slice_size(self, world: int) -> int:
        if self.global_batch % world:
            raise StoreError(f"global_batch {self.global_batch} cannot be split evenly between {world} ranks")
        return self.global_batch // world

    def _to_virtual(self, intervals) -> list[tuple[int, int, int]]:
        """(local start, virtual start, count) runs of this rank's position intervals."""
        rank, world = self._dist()
        if self.global_batch is None:
            return [(a, a, b - a) for a, b in intervals if b > a]
        return interleaved_runs(intervals, self.global_batch, self._slice_size(world), rank)

    def _chunks(self, order: EpochOrder, intervals, base: Base):
        """order.chunks() of this rank's position intervals: (position, epoch position, count)."""
        for local, virtual, n in self._to_virtual(intervals):
            for q, p, take in order.chunks([(virtual, virtual + n)], base):
                yield local + (q - virtual), p, take

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch (the same on every rank)."""
        a, b = self._rank_range()
        return b - a

    # -- state --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (nothing consumed yet)."""
        self.epoch = int(epoch)
        self._consumed = IntervalSet()
        self._spans = None
        self._next_worker = 0
        self._base = None

    def _complete_epoch(self, epoch: int) -> None:
        # A no-op once the epoch has moved on (set_epoch during the pass, or a second report of
        # the same end), so one pass can never advance two epochs.
        if self.epoch == epoch:
            self.set_epoch(epoch + 1)

    def _account_unreported(self) -> None:
        """After a full pass through a loader, positions never delivered were skipped in a worker
        that had no later sample to report them on: count them against their shards."""
        a, b = self._rank_range()
        missing = self._consumed.subtract_from(a, b)
        if not missing:
            return
        order = self._order(self.epoch)
        for q, p, n in self._chunks(order, missing, self._base_obj()):
            shard_ids, _ = order.locate(order.list_indices(p, n))
            for j, sid in enumerate(shard_ids.tolist()):
                self.record_delivered((), skipped=(SkippedRun(self.manifest.shards[sid].name, (q + j,)),))

    def state_dict(self) -> dict:
        """The resume state: JSON-able, small (intervals, not positions); see docs/FORMAT.md."""
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
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state` (a state_dict() or merge_states() result): the next iteration
        yields exactly the positions of that epoch not yet delivered. StoreError if the state
        belongs to another version, seed, shuffle setup or (unless merged) rank layout."""
        if state.get("format") != STATE_FORMAT:
            raise StoreError(f"unsupported PairDataset state format {state.get('format')!r} (expected {STATE_FORMAT})")
        mine = self.state_dict()
        merged = state.get("world_size") is None  # from merge_states: any rank layout may load it
        keys = ("version", "seed", "shuffle", "shuffle_block", "num_samples", "pad", "global_batch")
        keys += () if merged else ("rank", "world_size")
        bad = [f"{k}: saved {state.get(k)!r} vs now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if bad:
            raise StoreError(
                "PairDataset state does not belong to this dataset/rank setup (exact resume needs the same "
                "version, seed, shuffle settings and ranks): " + "; ".join(bad)
            )
        self.epoch = int(state["epoch"])
        self._consumed = IntervalSet(state["consumed"])
        done = int(state.get("global_batches_done") or 0)
        if merged and done:  # the first `done` global batches of the epoch are behind us, on any w
            self._consumed = IntervalSet([(0, done * self._slice_size(self.world_size))])
        spans = state.get("spans")
        self._spans = None if spans is None else [[tuple(iv) for iv in s] for s in spans]
        self._next_worker = int(state.get("next_worker", 0))
        self.skipped = dict(state.get("skipped", {}))
        base = state.get("base")
        self._base = None if base is None else [tuple(iv) for iv in base]

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every rank's state_dict() of the same step, loadable under any number of
        ranks (elastic resume). Global-batch mode, when every rank has read the same whole number
        k of its slices (a training step boundary): the epoch continues at global batch k, exactly
        as the uninterrupted run would, under any w dividing global_batch. Otherwise the samples no
        rank has delivered yet become the rest of the epoch, re-split evenly (each sample still
        read once, in a different grouping)."""
        if not states:
            raise StoreError("merge_states needs the state of every rank")
        first = states[0]
        keys = ("format", "version", "epoch", "seed", "shuffle", "shuffle_block", "num_samples", "world_size", "pad",
                "base", "global_batch")
        for st in states[1:]:
            bad = [k for k in keys if st.get(k) != first.get(k)]
            if bad:
                raise StoreError(f"merge_states: states disagree on {bad}; they must come from one step of one job")
        world = first["world_size"]
        ranks = sorted(st["rank"] for st in states)
        if world is None or ranks != list(range(world)):
            raise StoreError(f"merge_states needs exactly one state per rank 0..{world - 1 if world else '?'}, got ranks {ranks}")
        base = Base.full(first["num_samples"]) if first.get("base") is None else Base(first["base"])
        skipped: dict[str, int] = {}
        for st in states:
            for shard, n in st.get("skipped", {}).items():
                skipped[shard] = skipped.get(shard, 0) + n
        big = first.get("global_batch")
        done = 0
        if big is not None:
            size = big // world
            prefixes = {tuple(tuple(iv) for iv in st["consumed"]) for st in states}
            if len(prefixes) == 1:
                only = next(iter(prefixes))
                if only == () or (len(only) == 1 and only[0][0] == 0 and only[0][1] % size == 0):
                    done = only[0][1] // size if only else 0
                    out = dict(first)
                    out.update(rank=None, world_size=None, consumed=[], num_consumed=0, spans=None, next_worker=0,
                               skipped=skipped, global_batches_done=done)
                    return out
        delivered = IntervalSet()
        for st in states:
            consumed = [tuple(iv) for iv in st["consumed"]]
            if big is not None:
                runs = interleaved_runs(consumed, big, big // world, st["rank"])
                consumed = [(v, v + n) for _, v, n in runs]
            for a, b in base.epoch_positions(consumed):
                delivered.add(a, b)
        remaining = IntervalSet()
        for a, b in base.intervals:
            for lo, hi in delivered.subtract_from(a, b):
                remaining.add(lo, hi)
        out = dict(first)
        out.update(rank=None, world_size=None, consumed=[], num_consumed=0, spans=None, next_worker=0,
                   skipped=skipped, base=remaining.to_list(), global_batches_done=done)
        return out

    # -- loader protocol ------------------------------------------------------------------------
    # PairLoader (or any driver that records delivery itself) uses these four methods: plan in the
    # main process, iterate tagged samples in the workers, record each batch as it reaches the
    # caller, and finish the pass. Plain iteration (__iter__) does all of it by itself.
    def plan_workers(self, num_workers: int) -> None:
        """Fix how this pass's remaining positions are split between `num_workers` DataLoader
        workers. Call in the main process before the workers start, so every worker gets the same
        plan. With the worker count of the saved plan, each worker keeps its span and the round
        robin starts at the worker that was due next, so a resumed order equals the uninterrupted one."""
        self._freeze_dist()
        a, b = self._rank_range()
        if self._spans is not None and len(self._spans) == num_workers:
            k = self._next_worker % num_workers
            self._spans = self._spans[k:] + self._spans[:k]
        else:
            self._spans = split_by_count(self._consumed.subtract_from(a, b), num_workers)
        self._next_worker = 0

    def iter_tagged(self) -> Iterator[TaggedSample]:
        """This worker's share of the planned pass (all of it outside a DataLoader worker), in
        position order, as TaggedSamples. Records nothing: the caller reports what it delivers
        with record_delivered() and ends a complete pass with finish_pass()."""
        worker, num_workers = _worker_slot()
        if self._spans is None or len(self._spans) != num_workers:
            # Not planned for this worker count (e.g. a plain DataLoader): every worker holds the
            # same state, so each computes the same plan.
            self.plan_workers(num_workers)
        pending: list[SkippedRun] = []
        for item in self._items(worker):
            if isinstance(item, SkippedRun):
                pending.append(item)
                continue
            if pending:
                item = replace(item, skipped=tuple(pending))
                pending = []
            yield item

    def record_delivered(self, positions: Iterable[int], worker: int | None = None, num_workers: int = 1,
                         skipped: Iterable[SkippedRun] = ()) -> None:
        """Record what reached the caller, so state_dict() resumes right after it.

        Args:
            positions: the virtual positions delivered (TaggedSample.position).
            worker: the worker that produced the last of them: a resume with the same worker
                count starts with the worker after it. None leaves the round robin as it is.
            num_workers: the pass's number of workers.
            skipped: runs skipped along the way (TaggedSample.skipped), counted in `skipped`.
        """
        self._consumed.add_positions(positions)
        for run in skipped:
            self._consumed.add_positions(run.positions)
            self.skipped[run.shard] = self.skipped.get(run.shard, 0) + len(run.positions)
        if worker is not None:
            self._next_worker = (worker + 1) % max(1, num_workers)

    def finish_pass(self, epoch: int) -> None:
        """End a complete pass that began in epoch `epoch`: positions still unrecorded were
        skipped by a worker with no later sample to report them on, so they are counted against
        their shards; then the next epoch begins. Does nothing if the epoch has already moved on."""
        if self.epoch == epoch:
            self._account_unreported()
        self._complete_epoch(epoch)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """Samples of the rest of this epoch, as plain dicts. In the calling process the dataset
        records each sample as it is yielded, so state_dict() between samples resumes exactly; in
        a plain DataLoader's worker nothing is recorded (use PairLoader for resumable loading)."""
        if get_worker_info() is not None:
            for tagged in self.iter_tagged():
                yield tagged.sample
            return
        self.plan_workers(1)
        epoch = self.epoch
        for item in self._items(0):
            if isinstance(item, SkippedRun):
                self.record_delivered((), skipped=(item,))
                continue
            self.record_delivered((item.position,))
            yield item.sample
        self._complete_epoch(epoch)

    def _worker_positions(self, worker: int) -> list[tuple[int, int]]:
        a, b = self._rank_range()
        remaining = IntervalSet(self._consumed.subtract_from(a, b))
        return remaining.intersect(self._spans[worker])

    def _order(self, epoch: int) -> EpochOrder:
        return EpochOrder([s.num_samples for s in self.manifest.shards], self.seed, epoch, self.shuffle, self.shuffle_block)

    def _items(self, worker: int) -> Iterator[TaggedSample | SkippedRun]:
        """Worker `worker`'s planned positions in order: its samples and what it had to skip."""
        return self._stream(self._order(self.epoch), self._worker_positions(worker), self._base_obj(), worker)

    def _stream(self, order: EpochOrder, intervals, base: Base, worker: int) -> Iterator[TaggedSample | SkippedRun]:
        """Items for `intervals` in position order. Byte ranges are fetched on background threads
        `read_ahead` chunks ahead; index parsing and decoding stay on this thread (pyarrow driven
        from pool threads can abort the interpreter at exit when an iterator is abandoned)."""
        reader = _ChunkReader(self, worker)
        chunks = self._chunks(order, intervals, base)
        if self.read_ahead == 0:
            for q, p, n in chunks:
                plan = reader.plan(order, q, p, n)
                yield from reader.finish(plan, reader.fetch(plan))
            return
        pool = ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="pair-read-ahead")
        window: deque = deque()

        def submit(plan: _ChunkPlan) -> list:
            # One task per shard range, so the threads share even the first chunk's reads (a
            # shuffle block spans several shards) instead of one thread reading it alone.
            return [pool.submit(reader.fetch_read, r) for r in plan.reads]

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
        """Progress counters for logs: the epoch, positions consumed in it, skips per shard."""
        return {"epoch": self.epoch, "consumed": len(self._consumed), "skipped": dict(self.skipped)}


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker we run in; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class _ShardRead:
    """What one chunk needs from one shard: the rows, where they go in the chunk, and the byte
    range holding them, or the error that makes the shard unreadable."""

    shard: ShardInfo
    url: str
    slots: tuple[int, ...]  # offsets in the chunk: the row rows[k] is position chunk.first + slots[k]
    rows: tuple[int, ...]
    sidx: ShardIndex | None = None
    start: int = 0
    end: int = 0
    error: CorruptShardError | None = None


@dataclass(frozen=True)
class _ChunkPlan:
    """The reads for virtual positions [first, first + count), one per shard they touch."""

    first: int
    count: int
    reads: tuple[_ShardRead, ...]


class _ChunkReader:
    """Reads one chunk of positions: one index load (cached) and one byte range per shard."""

    def __init__(self, ds: PairDataset, worker: int):
        self.ds = ds
        self.worker = worker
        self.store = ds.store
        self.fields = ds.fields
        self.members = fetched_members(ds.fields)
        self.decoder = Decoder(ds.manifest.schema)
        self.indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self.unreadable: set[str] = set()

    def _index(self, shard: ShardInfo) -> ShardIndex:
        sidx = self.indexes.get(shard.name)
        if sidx is not None:
            self.indexes.move_to_end(shard.name)
            return sidx
        url = self.store.shard_url(shard.name)
        where = f"reading the index of shard {shard.name} ({layout.index_path(self.store.url, shard.name)})"
        try:
            with transient_as_unavailable(where):
                data = self.store.fs.cat_file(layout.index_path(self.store.root, shard.name))
        except FileNotFoundError:
            raise CorruptShardError(shard.name, url, "index file missing") from None
        if len(data) != shard.index_bytes or (self.ds.verify_hashes and xxhash.xxh3_64_hexdigest(data) != shard.index_xxh3):
            raise CorruptShardError(shard.name, url, "index does not match the manifest's size/xxh3")
        try:
            sidx = ShardIndex.from_bytes(shard.name, data, layout.index_path(self.store.url, shard.name))
        except StoreError as exc:
            raise CorruptShardError(shard.name, url, str(exc)) from exc
        if len(sidx) != shard.num_samples:
            raise CorruptShardError(shard.name, url, f"index has {len(sidx)} rows, manifest says {shard.num_samples}")
        self.indexes[shard.name] = sidx
        while len(self.indexes) > 16:
            self.indexes.popitem(last=False)
        return sidx

    def plan(self, order: EpochOrder, q: int, p: int, n: int) -> _ChunkPlan:
        """Which rows of which shards positions [q, q+n) need, with each shard's index loaded."""
        L = order.list_indices(p, n)
        shard_ids, rows = order.locate(L)
        by_shard: dict[int, list[int]] = {}
        for j, s in enumerate(shard_ids.tolist()):
            by_shard.setdefault(s, []).append(j)
        reads = []
        for s, js in by_shard.items():
            shard = self.ds.manifest.shards[s]
            url = self.store.shard_url(shard.name)
            slots = tuple(js)
            shard_rows = tuple(int(rows[j]) for j in js)
            try:
                if shard.name in self.unreadable:
                    raise CorruptShardError(shard.name, url, "unreadable (see the first error)")
                sidx = self._index(shard)
                start, end = sidx.byte_range(shard_rows, self.members)
                if end > shard.tar_bytes:
                    raise CorruptShardError(shard.name, url, "index points past the tar's end")
                reads.append(_ShardRead(shard, url, slots, shard_rows, sidx=sidx, start=start, end=end))
            except CorruptShardError as exc:
                reads.append(_ShardRead(shard, url, slots, shard_rows, error=exc))
        return _ChunkPlan(q, n, tuple(reads))

    def fetch(self, plan: _ChunkPlan) -> list:
        """fetch_read() for each of the plan's reads, on this thread."""
        return [self.fetch_read(r) for r in plan.reads]

    def fetch_read(self, read: _ShardRead):
        """One shard's byte range and its hash failures, or the error; I/O and hashing only, safe
        on a pool thread, so both overlap the consumer's decoding."""
        if read.error is not None:
            return read.error
        try:
            name = read.shard.name
            path = layout.tar_path(self.store.root, name)
            buf = fetch_range(self.store.fs, path, read.url, name, read.start, read.end)
            failed = hash_failures(buf, read.start, read.sidx, read.rows, self.members) if self.ds.verify_hashes else None
            return buf, failed
        except CorruptShardError as exc:
            return exc

    def finish(self, plan: _ChunkPlan, fetched_reads: list) -> list[TaggedSample | SkippedRun]:
        """The plan's items: a SkippedRun per shard for what could not be read (on_corrupt="skip"),
        then the TaggedSamples in position order."""
        q, n = plan.first, plan.count
        samples: list[TaggedSample | None] = [None] * n
        skipped: list[SkippedRun] = []
        skip = self.ds.on_corrupt == "skip"
        for read, fetched in zip(plan.reads, fetched_reads, strict=True):
            bad: list | None = [] if skip else None
            try:
                if isinstance(fetched, CorruptShardError):
                    raise fetched
                buf, failed = fetched
                got = decode_rows(buf, read.start, read.sidx, read.rows, self.fields, self.decoder, read.url, failed, bad)
            except CorruptShardError:
                # The shard cannot be read at all (missing, truncated, bad index): skip all of it.
                if not skip:
                    raise
                self.unreadable.add(read.shard.name)
                skipped.append(SkippedRun(read.shard.name, tuple(q + j for j in read.slots)))
                continue
            if bad:  # individual samples failed their hashes: skip just those
                skipped.append(SkippedRun(read.shard.name, tuple(q + read.slots[k] for k, _ in bad)))
            for j, sample in zip(read.slots, got, strict=True):
                if sample is not None:
                    samples[j] = TaggedSample(sample, q + j, self.worker)
        return [*skipped, *(t for t in samples if t is not None)]
