"""Run a function on several CPU ranks of one gloo group, as forked processes (the multi-worker
trainer tests: elastic resume, FSDP)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path


def run_on_ranks(rank_fn: Callable[[int, int, dict, str], None], config: dict, world: int, tmp: Path) -> None:
    """Call rank_fn(rank, world, config, rendezvous_file) in `world` forked processes and assert each
    exits 0; the rendezvous file is fresh per call, under `tmp`."""
    pg = tmp / f"pg-{len(list(tmp.glob('pg-*')))}"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_fn, args=(r, world, config, str(pg))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * world
