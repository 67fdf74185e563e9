"""Split a dataset into shards: fixed units of work, each a pure function of the config."""

from __future__ import annotations

from dataclasses import dataclass, field

from store import ShardInfo, layout


@dataclass(frozen=True)
class ShardTask:
    """One shard to generate: shard number `shard`, written under `name`, holding samples
    [`start`, `stop`) with their `prompts`. `attempt` counts earlier failed tries (the runner gives
    up after max_retries).

    `repair` is the manifest's record when the shard is committed but its files are damaged: the
    worker then regenerates it beside them and replaces them only if the bytes come out identical.
    """

    shard: int
    name: str
    start: int
    stop: int
    prompts: list[str] = field(default_factory=list, compare=False, repr=False)
    attempt: int = 0
    repair: ShardInfo | None = None

    @property
    def size(self) -> int:
        """Samples in the shard."""
        return self.stop - self.start


def shard_name(shard: int, count: int, shard_size: int) -> str:
    """Full shards are `shard-000012`; a short last shard carries its count, `shard-000012-p000232`,
    so extending the dataset later writes the full shard under a new name and never overwrites."""
    if count == shard_size:
        return layout.shard_name(shard)
    return layout.partial_shard_name(shard, count)


def plan_shards(num_pairs: int, shard_size: int) -> list[tuple[int, str, int, int]]:
    """(shard index, name, first sample, end sample) for every shard of `num_pairs` samples."""
    shards = []
    for i, start in enumerate(range(0, num_pairs, shard_size)):
        stop = min(start + shard_size, num_pairs)
        shards.append((i, shard_name(i, stop - start, shard_size), start, stop))
    return shards
