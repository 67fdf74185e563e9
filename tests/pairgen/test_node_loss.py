"""Losing a node with no spare capacity: pairgen finishes on what is left, says what happened, and
writes the same bytes as an uninterrupted run (a simulated 3-node cluster: a head without CPUs and two 1-CPU
workers, the CLI attached through RAY_ADDRESS as on a real cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pairgen.runner import PairgenRun
from store import PairStore
from tests.helpers.ray_cluster import simulated_cluster
from tests.pairgen.test_run import PROMPTS, _config, _shard_hashes

BIN = Path(sys.executable).parent


def test_pairgen_finishes_on_the_remaining_node(ray_local, sd15_teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    settings = dict(num_pairs=64, shard_size=8, steps=8, batch_size=4)
    reference = str(tmp_path / "reference")
    PairgenRun(_config(sd15_teacher, str(prompts), reference, **settings), progress=False).run()

    out = tmp_path / "pairs"
    with simulated_cluster(worker_nodes=2) as (cluster, workers):
        proc = subprocess.Popen(
            [str(BIN / "pairgen"), "run", "--teacher", str(sd15_teacher), "--prompts", str(prompts), "--out", str(out),
             "--num-pairs", "64", "--shard-size", "8", "--steps", "8", "--batch-size", "4", "--guidance", "2.0",
             "--seed", "5", "--workers", "2", "--cpus-per-worker", "1", "--actor-start-timeout", "20",
             "--no-progress"],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while len(list((out / "index").glob("shard-*"))) < 2 if (out / "index").exists() else True:
            assert proc.poll() is None and time.monotonic() < deadline, "no shard was finished in time"
            time.sleep(0.1)  # polling for files to appear, not waiting for time to pass
        cluster.remove_node(workers[1])
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    # The lost actor's shard went back to the queue and was done by the surviving actor; before, it was
    # sent to the replacement actor, which could never start, and the run waited forever.
    assert "actor died" in stderr and "retrying" in stderr, stderr[-3000:]
    assert _shard_hashes(str(out)) == _shard_hashes(reference)
    assert PairStore(str(out)).manifest().num_pairs == 64
