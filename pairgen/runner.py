"""The driver: plan shards, dispatch them to a pool of teacher actors on Ray, commit versions.

Fault tolerance: a shard whose actor dies or whose write fails goes back to the queue (bounded
retries) and the dead actor is replaced. Nothing partial is ever visible: a shard exists for
readers only once its index is written, and only committed versions are read by trainers.
Re-running the same command resumes: shards already complete on storage are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from d2g.cli.quiet import worker_env
from d2g.cli.ray_start import check_ray_address, ensure_ray
from d2g.teacher.loading import TeacherError, check_teacher
from pairgen.config import GenerationConfig
from pairgen.fingerprint import build_fingerprint
from pairgen.plan import ShardTask, plan_shards
from pairgen.prompts import PromptSource, load_prompts
from store import PairStore, ShardInfo, StoreError, absolute_url
from store.layout import shard_number
from store.s3_retries import retried_requests

# Test-only fault injection: the driver SIGKILLs itself after N shards finish in this run,
# exactly as an operator's `kill -9` or a lost head node would.
KILL_DRIVER_ENV = "D2G_FAULT_KILL_DRIVER_AFTER_SHARDS"


# Errors that say something is wrong with the data, the store or the teacher, not with a node: a
# retry would fail the same way (and could only produce a store with fewer pairs).
PERMANENT_ERRORS = (StoreError, TeacherError)


def _maybe_kill_driver(shards_finished: int) -> None:
    after = os.environ.get(KILL_DRIVER_ENV)
    if after and shards_finished >= int(after):
        os.kill(os.getpid(), signal.SIGKILL)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _repair_command() -> str:
    """The command line that ran us plus --repair, when we run as the pairgen CLI."""
    argv = sys.argv
    if argv and os.path.basename(argv[0]) == "pairgen":
        return shlex.join(["pairgen", *argv[1:], "--repair"])
    return "pairgen run ... --repair (or GenerationConfig(repair=True))"


class RunError(RuntimeError):
    """The run cannot start or cannot finish; the message says why and what was kept."""


@dataclass
class RunSummary:
    """What a run did, for the CLI's summary line and `--json`: its `out` root and `version`; the
    plan (`num_pairs`, `num_shards`, `workers`); the work (`shards_generated`, `shards_reused`,
    `shards_repaired`, `pairs_generated`, `bytes_written`, `seconds` of wall time, `worker_seconds`
    of actor time); the trouble (`retries` of shards, `actors_replaced`, `truncated_prompts`,
    `empty_prompts_skipped`, `actors_given_up` for lack of resources, `actors_restarted` in their
    place once capacity came back, and `s3_retries`: S3 requests that failed and were re-sent, by
    the driver and by the actors for the shards they finished); and `shards_by_node`: the shards
    each Ray node id generated."""

    out: str
    num_pairs: int = 0
    num_shards: int = 0
    shards_generated: list[str] = field(default_factory=list)
    shards_reused: int = 0
    pairs_generated: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0
    retries: int = 0
    actors_replaced: int = 0
    truncated_prompts: int = 0
    empty_prompts_skipped: int = 0
    version: int | None = None
    workers: int = 0
    shards_repaired: list[str] = field(default_factory=list)
    actors_given_up: int = 0
    actors_restarted: int = 0
    s3_retries: int = 0
    shards_by_node: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The summary as JSON-ready values, with the derived rates (pairs/s, per worker, per busy second)."""
        data = dict(self.__dict__)
        data["pairs_per_second"] = self.pairs_generated / self.seconds if self.seconds else 0.0
        data["pairs_per_second_per_worker"] = data["pairs_per_second"] / max(self.workers, 1)
        # Throughput while an actor is busy with a shard (solve + overlapped write), i.e. without
        # actor start-up and teacher loading: the figure to compare with a bare loop.
        data["pairs_per_busy_worker_second"] = (self.pairs_generated / self.worker_seconds
                                                if self.worker_seconds else 0.0)
        return data


def _actor_resources(ray, config: GenerationConfig) -> tuple[float, float]:
    cluster = ray.cluster_resources()
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    cpus = config.cpus_per_worker
    if cpus is None:
        # Fractional, so a pool never takes every CPU and starves the driver's own tasks.
        cpus = max(0.1, min(1.0, cluster.get("CPU", 1) / (config.workers + 1)))
    return cpus, gpus


@dataclass
class _Slot:
    """One teacher actor in the place of worker `worker`: ready once its `ping` answered (teacher
    loaded; `where` says on which node); `load` shards queued on it; `restart` if it is a new try for
    a worker that was given up for lack of resources."""

    actor: object
    ping: object
    started: float
    worker: int
    restart: bool = False
    ready: bool = False
    load: int = 0
    where: dict = field(default_factory=dict)


class _ActorPool:
    """Teacher actors, replaced when they die. Shards go only to actors that are running (their
    teacher loaded), at most `depth` each, so the next shard is already queued when one finishes but
    no shard waits on an actor that may never start: a replacement that finds no free resources
    within `start_timeout` seconds is given up and the run goes on with fewer actors. A worker given
    up is tried again every `restart_interval` seconds (`restart_missing`), so capacity that comes
    back (a node added back) is used again; a try still pending never receives a shard."""

    def __init__(self, ray, config: GenerationConfig, depth: int = 2):
        from pairgen.worker import ShardGenerator

        self.ray = ray
        self.config = config
        self.depth = depth
        cpus, gpus = _actor_resources(ray, config)
        # The driver's -v and test-only fault injection travel to the actors, on any cluster.
        env = {**worker_env(), **{k: v for k, v in os.environ.items() if k.startswith("D2G_FAULT_")}}
        self._remote = ray.remote(ShardGenerator).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": env})
        self.slots: dict[int, _Slot] = {}
        # Workers given up for lack of resources -> when to try starting them again.
        self.missing: dict[int, float] = {}
        self._next_id = 0
        for worker in range(config.workers):
            self._start(worker)
        self.replaced = 0
        self.given_up = 0
        self.restarted = 0

    def _start(self, worker: int, restart: bool = False) -> None:
        actor = self._remote.remote(self.config.model_dump(), self.config.threads_per_worker)
        self.slots[self._next_id] = _Slot(actor, actor.ping.remote(), time.monotonic(), worker, restart)
        self._next_id += 1

    def starting_refs(self) -> list:
        """The pings of actors still starting, to wait on beside the shards in flight."""
        return [s.ping for s in self.slots.values() if not s.ready]

    def mark_started(self, ref) -> int | None:
        """Record that ping `ref` answered; returns its slot, or None if `ref` is not a ping.
        Raises what the ping raised (an actor that died while starting)."""
        for slot_id, s in self.slots.items():
            if s.ping == ref and not s.ready:
                where = self.ray.get(ref)
                s.where = where if isinstance(where, dict) else {}
                s.ready = True
                if s.restart:
                    self.restarted += 1
                return slot_id
        return None

    def is_ping(self, ref) -> bool:
        """Whether `ref` is the ping of an actor still starting."""
        return any(s.ping == ref and not s.ready for s in self.slots.values())

    def free_slot(self) -> int | None:
        """The least loaded running actor with room for another queued shard, else None."""
        ready = [i for i, s in self.slots.items() if s.ready and s.load < self.depth]
        return min(ready, key=lambda i: self.slots[i].load) if ready else None

    def replace(self, slot_id: int) -> None:
        """Kill the actor of `slot_id` (if it still lives) and start a fresh one in its place."""
        slot = self.slots.pop(slot_id)
        self._kill(slot.actor)
        self._start(slot.worker)
        self.replaced += 1

    def retry_later(self, slot_id: int) -> None:
        """Kill the actor of `slot_id` (a new try for a given-up worker that died while starting:
        its node went away again) and try that worker again after the restart interval."""
        slot = self.slots.pop(slot_id)
        self._kill(slot.actor)
        self.missing[slot.worker] = time.monotonic() + self.config.actor_restart_interval

    def give_up_stalled(self, timeout: float) -> int:
        """While some actor runs, remove actors that have been starting for longer than `timeout` s
        (no free CPU/GPU left for them: the work can go on without them) and schedule their workers'
        next try; returns how many were given up for the first time (new tries given up again are
        not news)."""
        if not self.running():
            return 0
        now = time.monotonic()
        stalled = [i for i, s in self.slots.items() if not s.ready and now - s.started > timeout]
        first_time = 0
        for slot_id in stalled:
            slot = self.slots.pop(slot_id)
            self._kill(slot.actor)
            self.missing[slot.worker] = now + self.config.actor_restart_interval
            first_time += not slot.restart
        self.given_up += first_time
        return first_time

    def restart_missing(self) -> None:
        """Start a new try for each given-up worker whose next try is due. It only asks Ray for an
        actor (no waiting): its ping is watched with the shards in flight, and it gets shards only
        once it answers."""
        now = time.monotonic()
        for worker, due in list(self.missing.items()):
            if now >= due:
                del self.missing[worker]
                self._start(worker, restart=True)

    def running(self) -> int:
        """Actors with their teacher loaded."""
        return sum(s.ready for s in self.slots.values())

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def shutdown(self) -> None:
        """Kill every actor (new tries still pending included); their unfinished shards are redone
        by the next run."""
        for s in self.slots.values():
            self._kill(s.actor)


def _validate_against_store(st: PairStore, config: GenerationConfig, fingerprint: dict) -> None:
    latest = st.latest_version()
    if latest is not None:
        have = st.manifest(latest).num_pairs
        if config.num_pairs < have:
            raise RunError(
                f"--num-pairs {config.num_pairs} is smaller than version v{latest} of {config.out}, which "
                f"holds {have} pairs; pairgen never deletes pairs (use a new --out for a smaller dataset)"
            )
    st.ensure_fingerprint(fingerprint)


class PairgenRun:
    """One `pairgen run`: validates against the store, plans shards, dispatches the missing ones to
    teacher actors, and commits versions. Use `PairgenRun(config).run()`."""

    def __init__(self, config: GenerationConfig, progress: bool = True, log=None):
        """Read the prompts and build the fingerprint; nothing is written and Ray is not started.

        Args:
            config: the run's settings; a relative local --out is made absolute here, because Ray
                workers do not run in the user's working directory.
            progress: show a progress bar on stderr.
            log: where one-line notices go (default: stderr).
        """
        config = config.model_copy(update={"out": absolute_url(config.out)})
        self.config = config
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.prompts: PromptSource = load_prompts(config.prompts, config.prompt_column)
        self.fingerprint = build_fingerprint(config, self.prompts)
        self.store = PairStore(config.out)
        self.summary = RunSummary(out=config.out, workers=config.workers,
                                  empty_prompts_skipped=self.prompts.empty_skipped)

    def _tasks(self, complete: dict[str, ShardInfo], damaged: dict[str, ShardInfo]
               ) -> tuple[list[ShardTask], list[ShardInfo]]:
        todo, done = [], []
        for shard, name, start, stop in plan_shards(self.config.num_pairs, self.config.shard_size):
            if name in damaged:
                todo.append(ShardTask(shard, name, start, stop, self.prompts.prompts_for(start, stop),
                                      repair=damaged[name]))
            elif name in complete:
                done.append(complete[name])
            else:
                todo.append(ShardTask(shard, name, start, stop, self.prompts.prompts_for(start, stop)))
        return todo, done

    def _damaged_committed_shards(self) -> dict[str, ShardInfo]:
        """Committed shards whose files no longer match the manifest: refused unless --repair."""
        damaged = self.store.damaged_shards()
        if damaged and not self.config.repair:
            listing = "; ".join(f"{info.name}: {reason}" for info, reason in damaged[:5])
            raise RunError(
                f"{len(damaged)} committed shard(s) of {self.config.out} are damaged ({listing}"
                f"{'; ...' if len(damaged) > 5 else ''}). Nothing was written. Repair them with the same "
                f"command plus --repair: {_repair_command()}")
        return {info.name: info for info, _ in damaged}

    def _commit(self, shards: dict[str, ShardInfo], repaired: list[str] | None = None) -> int:
        parent = self.store.latest_version()
        if parent is not None:
            previous = self.store.manifest(parent)
            committed = {s.name for s in previous.shards}
            if committed == set(shards) and not repaired:
                return parent
            # A short last shard is replaced by its full version when a dataset grows, so coverage is
            # by shard number, and the pair count may only grow.
            covered = {shard_number(name) for name in shards}
            missing = sorted(name for name in committed if shard_number(name) not in covered)
            if missing or sum(s.num_samples for s in shards.values()) < previous.num_pairs:
                # pairgen never deletes pairs: a trainer reading the bare URL must never get fewer.
                raise RunError(
                    f"refusing to commit a version of {self.config.out} without {len(missing)} shard(s) of "
                    f"v{parent} ({', '.join(missing[:5]) or 'partly'}{', ...' if len(missing) > 5 else ''}); it "
                    f"would hold {sum(s.num_samples for s in shards.values())} pairs instead of "
                    f"{previous.num_pairs}. Run `store verify {self.config.out}` to see what is damaged.")
        manifest = self.store.commit(sorted(shards.values(), key=lambda s: s.name), parent=parent,
                                     extra={"pairgen": {"target_num_pairs": self.config.num_pairs,
                                                        "shard_size": self.config.shard_size,
                                                        "complete": len(shards) == self.summary.num_shards,
                                                        **({"repaired": repaired} if repaired else {})}})
        return manifest.version

    def run(self) -> RunSummary:
        """Generate what the store lacks (resuming, extending or repairing) and commit it; returns
        the summary. RunError, StoreError or TeacherError for what the user must fix."""
        # Everything a user can get wrong is checked here, before Ray starts and before the first
        # byte is written to --out (the prompts were read in __init__).
        driver_retried_before = retried_requests()
        check_teacher(self.config.teacher, self.config.revision)
        check_ray_address(os.environ.get("RAY_ADDRESS", ""))
        _validate_against_store(self.store, self.config, self.fingerprint)
        plan = plan_shards(self.config.num_pairs, self.config.shard_size)
        self.summary.num_shards = len(plan)
        self.summary.num_pairs = self.config.num_pairs
        damaged = self._damaged_committed_shards()
        todo, reused = self._tasks(self.store.complete_shards(), damaged)
        wanted = {name for _, name, _, _ in plan}
        done: dict[str, ShardInfo] = {s.name: s for s in reused if s.name in wanted}
        self.summary.shards_reused = len(done)
        began = time.perf_counter()
        if todo:
            self._dispatch(todo, done)
        self.summary.seconds = time.perf_counter() - began
        self.summary.shards_repaired = sorted(damaged)
        self.summary.version = self._commit(done, repaired=sorted(damaged))
        # The actors' counts came in with their shards; the driver's own requests (listings,
        # indexes, the commits) are counted in this process.
        self.summary.s3_retries += retried_requests() - driver_retried_before
        return self.summary

    def _dispatch(self, todo: list[ShardTask], done: dict[str, ShardInfo]) -> None:
        from tqdm import tqdm

        ray = ensure_ray()
        pool = _ActorPool(ray, self.config)
        pending = deque(todo)
        inflight: dict = {}
        since_commit = 0
        bar = tqdm(total=sum(t.size for t in todo), unit="pair", desc="pairgen", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            while pending or inflight:
                while pending and (slot := pool.free_slot()) is not None:
                    task = pending.popleft()
                    ref = pool.slots[slot].actor.generate.remote(task)
                    inflight[ref] = (slot, task)
                    pool.slots[slot].load += 1
                # A timeout, so a pool whose actors cannot start is noticed instead of waited on forever.
                ready, _ = ray.wait(list(inflight) + pool.starting_refs(), num_returns=1, timeout=1.0)
                self._check_capacity(pool, inflight, pending)
                for ref in ready:
                    if pool.is_ping(ref):
                        self._actor_started(pool, ref, inflight, pending)
                        continue
                    slot, task = inflight.pop(ref)
                    if slot in pool.slots:
                        pool.slots[slot].load = max(0, pool.slots[slot].load - 1)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as err:
                        self._retry(task, pending, f"actor died ({_first_line(err)})")
                        self._requeue_actor_tasks(slot, inflight, pending)
                        if slot in pool.slots:
                            pool.replace(slot)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        if isinstance(err.cause, PERMANENT_ERRORS):
                            # Retrying cannot fix corruption, immutability, a fingerprint or a bad
                            # teacher; the actor's own message is the one the user needs.
                            raise RunError(f"shard {task.name}: {err.cause}") from err.cause
                        self._retry(task, pending, f"failed: {err.cause!r}" if err.cause else str(err))
                        continue
                    info = ShardInfo.from_dict(result["info"])
                    done[info.name] = info
                    node = pool.slots[slot].where.get("node_id", "") if slot in pool.slots else ""
                    self.summary.shards_by_node[node] = self.summary.shards_by_node.get(node, 0) + 1
                    self.summary.shards_generated.append(info.name)
                    self.summary.pairs_generated += result["samples"]
                    self.summary.worker_seconds += result["seconds"]
                    self.summary.bytes_written += info.tar_bytes + info.index_bytes
                    self.summary.truncated_prompts += result["truncated"]
                    self.summary.s3_retries += result.get("s3_retries", 0)
                    bar.update(result["samples"])
                    bar.set_postfix(retries=self.summary.retries, shards=len(done))
                    since_commit += 1
                    if self.config.commit_every and since_commit >= self.config.commit_every:
                        self.summary.version = self._commit(done)
                        since_commit = 0
                    _maybe_kill_driver(len(self.summary.shards_generated))
        except BaseException:
            # Keep what is finished: commit it so a trainer can use it and a re-run skips it.
            if done:
                try:
                    self.summary.version = self._commit(done)
                except Exception as commit_err:  # the original error matters more
                    self.log(f"pairgen: could not commit finished shards: {commit_err}")
            raise
        finally:
            bar.close()
            self.summary.actors_replaced = pool.replaced
            self.summary.actors_given_up = pool.given_up
            self.summary.actors_restarted = pool.restarted
            pool.shutdown()
            # Killed actors leave their shard's temp files behind; the shards are redone next run.
            for _, task in inflight.values():
                self.store.discard_partial_shard(task.name)

    def _retry(self, task: ShardTask, pending: deque, reason: str) -> None:
        if task.attempt >= self.config.max_retries:
            raise RunError(f"shard {task.name} failed {task.attempt + 1} times; last: {reason}. "
                           "Finished shards are kept; re-run the same command to continue.")
        self.summary.retries += 1
        self.log(f"pairgen: shard {task.name} {reason}; retrying (attempt {task.attempt + 2})")
        pending.appendleft(dataclasses.replace(task, attempt=task.attempt + 1))

    def _requeue_actor_tasks(self, slot: int, inflight: dict, pending: deque) -> None:
        # The dead actor's queued shard would fail too; put it back without counting a retry.
        for ref, (other_slot, task) in list(inflight.items()):
            if other_slot == slot:
                inflight.pop(ref)
                pending.appendleft(task)

    def _actor_started(self, pool: _ActorPool, ref, inflight: dict, pending: deque) -> None:
        """An actor's ping answered: it runs; or it died while starting (its node went away, or
        __init__ failed): start another in its place, within the retry budget."""
        ray = pool.ray
        try:
            slot_id = pool.mark_started(ref)
        except ray.exceptions.RayError as err:
            slot = next(i for i, s in pool.slots.items() if s.ping == ref)
            if pool.slots[slot].restart:
                # A new try for a given-up worker whose node went away again: try again later, as
                # for any worker without resources; the retry budget is for shards and first starts.
                pool.retry_later(slot)
                return
            if pool.replaced >= self.config.max_retries * max(1, self.config.workers):
                raise RunError(f"teacher actors keep dying while starting; last: {_first_line(err)}. "
                               "Finished shards are kept; re-run the same command to continue.") from err
            self.log(f"pairgen: a teacher actor died while starting ({_first_line(err)}); starting another")
            pool.replace(slot)
            return
        started = pool.slots[slot_id] if slot_id is not None else None
        if started is not None and started.restart:
            where = started.where
            self.log(f"pairgen: worker {started.worker} restarted on node {where.get('node_ip') or '?'} "
                     f"(node id {where.get('node_id') or '?'}); {pool.running()} of {self.config.workers} workers")

    def _check_capacity(self, pool: _ActorPool, inflight: dict, pending: deque) -> None:
        """Give up on actors that cannot start (the cluster lost the node their resources were on),
        say so, and stop if none is left running or starting."""
        timeout = self.config.actor_start_timeout
        if pool.give_up_stalled(timeout):
            self.log(f"pairgen: a teacher actor found no free resources within {timeout:g} s (a node was lost?); "
                     f"continuing with {pool.running()} of {self.config.workers} worker(s), trying to start "
                     f"the others again every {self.config.actor_restart_interval:g} s")
        pool.restart_missing()
        now = time.monotonic()
        if not pool.slots or (not pool.running() and all(now - s.started > timeout for s in pool.slots.values())):
            raise RunError(f"no teacher actor could start within {timeout:g} s (no free CPU/GPU on the cluster); "
                           "finished shards are committed; re-run the same command when capacity is back")


def run(config: GenerationConfig, progress: bool = True) -> RunSummary:
    """`PairgenRun(config, progress).run()`."""
    return PairgenRun(config, progress=progress).run()
