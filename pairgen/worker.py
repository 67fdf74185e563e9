"""One teacher, loaded once, turning shard tasks into committed-ready shards.

`ShardGenerator` is a plain class (used in-process by tests and benchmarks) that the runner wraps
as a Ray actor. Writing overlaps with compute: a background thread serialises, hashes and uploads
batch k while the teacher solves batch k+1.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import torch

from d2g.cli.quiet import quiet_third_party
from d2g.teacher.loading import load_teacher
from d2g.teacher.noise import batch_noise, sample_seed
from d2g.teacher.solver import TeacherSolver, to_numpy
from pairgen.config import GenerationConfig, solver_settings
from pairgen.plan import ShardTask
from store import TRAJECTORY, TRAJECTORY_TIMESTEPS, FieldSpec, PairStore, Schema, layout
from store.s3_retries import retried_requests

# Test-only fault injection: "SHARD:BATCHES:MARKER" makes the process die (as a node would) after
# writing BATCHES batches of shard SHARD, once: the marker file records that it happened.
CRASH_ENV = "D2G_FAULT_CRASH_SHARD"


def _maybe_crash(shard: int, batches_done: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, after, marker = spec.split(":", 2)
    if int(target) == shard and batches_done >= int(after) and not Path(marker).exists():
        Path(marker).write_text(f"crashed in shard {shard} after {batches_done} batches\n")
        os._exit(1)


class _BackgroundWriter:
    """Feeds `writer` (an open shard writer) from a bounded queue on its own thread
    (back-pressure: 2 batches), so writing overlaps with the next solve."""

    def __init__(self, writer):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                for sample in item:
                    self.writer.write(**sample)
            except BaseException as err:  # re-raised on the compute thread
                self.error = err

    def put(self, samples: list[dict]) -> None:
        """Queue one batch of samples (blocks while 2 wait); re-raises an earlier failed write."""
        if self.error is not None:
            raise self.error
        self.queue.put(samples)

    def finish(self) -> None:
        """Write what is queued, stop the thread, and re-raise a write that failed."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class ShardGenerator:
    """Loads the teacher once, then solves and writes whole shards (the runner's Ray actor).

    Args:
        config: the run's GenerationConfig, or its model_dump() (what Ray ships to an actor).
        threads: torch CPU threads for this process; None or 0 keeps torch's setting.
    """

    def __init__(self, config: dict | GenerationConfig, threads: int | None = None):
        quiet_third_party()
        self.config = config if isinstance(config, GenerationConfig) else GenerationConfig(**config)
        if threads:
            torch.set_num_threads(threads)
        self.pipe = load_teacher(self.config.teacher, dtype=self.config.dtype, device=self.config.device,
                                 revision=self.config.revision, drop_t5=self.config.drop_t5)
        self.solver = TeacherSolver(self.pipe, solver_settings(self.config))
        self.store = PairStore(self.config.out)
        self.schema = Schema(fields={name: FieldSpec(dtype=dtype, shape=tuple(shape))
                                     for name, (dtype, shape) in self.solver.schema().items()})

    def ping(self) -> dict:
        """Where this actor runs ({node_id, node_ip, pid}; the node fields are empty outside Ray): a
        cheap remote call that answers once the actor has loaded its teacher."""
        node_id = node_ip = ""
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
                node_ip = ray.util.get_node_ip_address()
        except ImportError:  # the class is also used in-process, without Ray
            pass
        return {"node_id": node_id, "node_ip": node_ip, "pid": os.getpid()}

    def _samples(self, task: ShardTask, indices: list[int], prompts: list[str], arrays: dict) -> list[dict]:
        numpy_arrays = {k: to_numpy(v) for k, v in arrays.items()}
        meta = {TRAJECTORY_TIMESTEPS: self.solver.trajectory_timesteps()} if TRAJECTORY in arrays else None
        return [
            dict(key=layout.default_key(j), index=j, prompt=prompts[row], seed=sample_seed(self.config.seed, j),
                 arrays={k: v[row] for k, v in numpy_arrays.items()}, meta=meta)
            for row, j in enumerate(indices)
        ]

    def generate(self, task: ShardTask) -> dict:
        """Solve and write one shard; returns its ShardInfo as a dict plus run statistics (seconds,
        truncated prompts, samples, and the S3 requests retried while writing it)."""
        began = time.perf_counter()
        # An actor runs one shard at a time, so the process's count moves only for this shard.
        retried_before = retried_requests()
        truncated = self.solver.count_truncated(task.prompts)
        batch_size = self.config.batch_size
        opened = (self.store.repair_shard_writer(task.repair, self.schema) if task.repair is not None
                  else self.store.open_shard_writer(task.name, self.schema))
        with opened as writer:
            background = _BackgroundWriter(writer)
            try:
                for batch_no, offset in enumerate(range(0, task.size, batch_size)):
                    indices = list(range(task.start + offset, min(task.start + offset + batch_size, task.stop)))
                    prompts = task.prompts[offset: offset + len(indices)]
                    noise = batch_noise(self.config.seed, indices, self.solver.latent_shape)
                    arrays = self.solver.solve(prompts, noise)
                    background.put(self._samples(task, indices, prompts, arrays))
                    _maybe_crash(task.shard, batch_no + 1)
            finally:
                background.finish()
        return {"info": writer.info.to_dict(), "seconds": time.perf_counter() - began,
                "truncated": truncated, "samples": task.size, "name": task.name,
                "s3_retries": retried_requests() - retried_before}
