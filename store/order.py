"""The epoch's canonical sample order and how it is cut between ranks and workers.

Position p of epoch e maps to a sample by a pure function of (seed, e, p): shards are permuted
by (seed, e), their samples concatenated into a list L, and L is shuffled only within consecutive
blocks of `block` positions by (seed, e, block). Nothing here grows with the dataset beyond one
int per shard, and any process can recompute any position, which is what makes resume exact.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np


class EpochOrder:
    """The canonical order of one epoch: epoch position p -> L index -> (shard, row)."""

    def __init__(self, shard_counts: list[int], seed: int, epoch: int, shuffle: bool, block: int):
        """Fix the shard permutation now; block permutations are drawn when first needed.

        Args:
            shard_counts: samples per shard, in manifest order.
            seed: the shuffle seed.
            epoch: the epoch whose order this is.
            shuffle: permute shards and shuffle within blocks; False keeps manifest and row order.
            block: the shuffle block size in positions.
        """
        self.num_samples = int(sum(shard_counts))
        self.block = max(1, int(block))
        self.shuffle = shuffle
        self.seed, self.epoch = int(seed), int(epoch)
        n = len(shard_counts)
        if shuffle:
            self.shard_order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(n)
        else:
            self.shard_order = np.arange(n)
        counts = np.asarray(shard_counts, dtype=np.int64)[self.shard_order]
        # starts[i] = first L index of the i-th shard in epoch order
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _block_perm(self, b: int) -> np.ndarray:
        perm = self._perms.get(b)
        if perm is None:
            size = min(self.block, self.num_samples - b * self.block)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, 1, b]).permutation(size)
            else:
                perm = np.arange(size)
            self._perms[b] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def list_indices(self, p: int, count: int) -> np.ndarray:
        """L indices of positions [p, p+count), which must lie inside one block."""
        b = p // self.block
        lo = p - b * self.block
        return b * self.block + self._block_perm(b)[lo : lo + count]

    def locate(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in manifest order, row within that shard) for each L index."""
        i = np.searchsorted(self.starts, L, side="right") - 1
        return self.shard_order[i], L - self.starts[i]

    def chunks(self, intervals: list[tuple[int, int]], base: Base | None = None):
        """Split virtual positions into runs that stay inside one block: (q, p, count), q the
        virtual position and p the epoch position. Virtual position q is the (q mod M)-th position
        of `base` (all N positions when None): positions past the end wrap around (rank padding)."""
        base = base or Base.full(self.num_samples)
        for a, b in intervals:
            for q, p, n in base.runs(a, b):
                while n > 0:
                    blk_end = (p // self.block + 1) * self.block
                    take = min(n, blk_end - p)
                    yield q, p, take
                    q, p, n = q + take, p + take, n - take


class Base:
    """The epoch positions a (resumed) epoch still covers, as sorted intervals; virtual position
    v means its (v mod size)-th element. A fresh epoch's base is all of [0, N)."""

    def __init__(self, intervals):
        """`intervals`: sorted, disjoint [start, end) pairs of epoch positions (empty ones dropped)."""
        self.intervals = [(int(a), int(b)) for a, b in intervals if b > a]
        self.cum = np.concatenate([[0], np.cumsum([b - a for a, b in self.intervals])]).astype(np.int64)

    @classmethod
    def full(cls, n: int) -> Base:
        """The base of a fresh epoch of `n` samples: all of [0, n)."""
        return cls([(0, n)])

    @property
    def size(self) -> int:
        """The number of epoch positions in the base."""
        return int(self.cum[-1])

    def runs(self, a: int, b: int):
        """(v, p, count) runs for virtual positions [a, b), each contiguous in epoch positions."""
        M = self.size
        if M == 0:
            return
        v = a
        while v < b:
            k = v % M
            i = int(np.searchsorted(self.cum, k, side="right")) - 1
            lo, hi = self.intervals[i]
            p = lo + (k - int(self.cum[i]))
            take = min(b - v, hi - p)
            yield v, p, take
            v += take

    def epoch_positions(self, virtual: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The epoch positions that virtual position intervals stand for, as sorted intervals."""
        out = IntervalSet()
        for a, b in virtual:
            for _, p, n in self.runs(a, b):
                out.add(p, p + n)
        return out.to_list()


def rank_range(num_samples: int, world_size: int, rank: int, pad: bool) -> tuple[int, int]:
    """Virtual positions [start, end) of one rank; every rank gets the same count."""
    per_rank = math.ceil(num_samples / world_size) if pad else num_samples // world_size
    return rank * per_rank, (rank + 1) * per_rank


def global_batches(num_samples: int, global_batch: int, pad: bool) -> int:
    """Global batches in an epoch of `num_samples` positions: the last one padded (wrapping to the
    start) or dropped when incomplete."""
    return math.ceil(num_samples / global_batch) if pad else num_samples // global_batch


def interleaved_runs(intervals, global_batch: int, slice_size: int, rank: int) -> list[tuple[int, int, int]]:
    """Map one rank's local positions to virtual positions in the global-batch mode: local j is
    position j % slice_size of the rank's slice of global batch j // slice_size, i.e. virtual
    (j // slice_size) * global_batch + rank * slice_size + j % slice_size. Returns (local start,
    virtual start, count) runs, each inside one slice."""
    out = []
    for a, b in intervals:
        j = int(a)
        while j < b:
            k, off = divmod(j, slice_size)
            take = min(int(b) - j, slice_size - off)
            out.append((j, k * global_batch + rank * slice_size + off, take))
            j += take
    return out


def split_by_count(intervals: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut a sorted interval list into `parts` contiguous pieces of near-equal sample counts."""
    total = sum(b - a for a, b in intervals)
    bounds = [total * k // parts for k in range(parts + 1)]
    out: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    seen = 0
    for a, b in intervals:
        for k in range(parts):
            lo = max(a, a + bounds[k] - seen)
            hi = min(b, a + bounds[k + 1] - seen)
            if hi > lo:
                out[k].append((lo, hi))
        seen += b - a
    return out


class IntervalSet:
    """A set of ints stored as sorted, disjoint, half-open intervals."""

    def __init__(self, intervals=()):
        """A set holding the [start, end) `intervals` given (any order, may overlap)."""
        self._iv: list[list[int]] = []
        for a, b in intervals:
            self.add(int(a), int(b))

    def add(self, a: int, b: int) -> None:
        """Add [a, b), merging with the intervals it touches."""
        if b <= a:
            return
        merged = []
        placed = False
        for s, e in self._iv:
            if e < a:
                merged.append([s, e])
            elif b < s:
                if not placed:
                    merged.append([a, b])
                    placed = True
                merged.append([s, e])
            else:
                a, b = min(a, s), max(b, e)
        if not placed:
            merged.append([a, b])
        merged.sort()
        self._iv = merged

    def add_positions(self, positions) -> None:
        """Add single ints, grouping consecutive ones into intervals."""
        ps = sorted(set(int(p) for p in positions))
        i = 0
        while i < len(ps):
            j = i
            while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
                j += 1
            self.add(ps[i], ps[j] + 1)
            i = j + 1

    def subtract_from(self, a: int, b: int) -> list[tuple[int, int]]:
        """[a, b) minus this set, as sorted intervals."""
        out = []
        cur = a
        for s, e in self._iv:
            if e <= cur:
                continue
            if s >= b:
                break
            if s > cur:
                out.append((cur, min(s, b)))
            cur = max(cur, e)
            if cur >= b:
                break
        if cur < b:
            out.append((cur, b))
        return out

    def intersect(self, intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of `intervals` inside this set, as sorted intervals."""
        out = []
        for a, b in intervals:
            for s, e in self._iv:
                lo, hi = max(a, s), min(b, e)
                if hi > lo:
                    out.append((lo, hi))
        return sorted(out)

    def __len__(self) -> int:
        return sum(e - s for s, e in self._iv)

    def to_list(self) -> list[list[int]]:
        """The intervals as JSON-able [start, end) lists."""
        return [list(x) for x in self._iv]
