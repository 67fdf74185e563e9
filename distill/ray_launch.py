"""Run the trainer on Ray Train (TorchTrainer: one process per rank, DDP process group set up by
Ray: gloo on CPU, NCCL on GPUs; with --fsdp the trainer shards its trainable modules over that
group, distill.fsdp), or in this process without Ray.

What a Ray Train run shows, quiet by default and loud on request: rank 0 sends its progress to a
small actor (`ProgressInbox`) that the driver polls, and the driver renders it exactly as an
in-process run does (one bar on a terminal, else a plain line every log_every steps with rate and
ETA), plus a line when Ray Train restarts the worker group. Ray's own output (worker stdout/stderr,
Ray Train's banners, library warnings inside workers) reaches the terminal only with -v; it is
always in the Ray session's log files.

How a Ray Train run ends when it does not finish, each as one line (the traceback only with -v):
- a worker that cannot see --data or --out from its node (distill.shared_storage), or that stops on
  purpose (TrainingStopped: a non-finite loss, a rank count that cannot split the global batch):
  the driver stops the run at once (retrying cannot help) and raises RayRunFailed with its message;
- more than max_failures worker-group failures: RayRunFailed naming what failed, on which node, the
  latest complete checkpoint in --out and the command that resumes from it;
- Ctrl-C: the driver stops the workers (Ray Train's own handler would want three) and raises
  KeyboardInterrupt with the same checkpoint and resume line (the CLI prints it, exit 130).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from d2g.teacher.loading import absolute_teacher
from distill.metrics import ProgressDisplay
from distill.shared_storage import SharedStorageError, check_worker_sees, leave_marker, remove_marker
from distill.train_config import TrainConfig, TrainConfigError
from distill.trainer import Trainer, TrainingStopped, TrainSummary
from store import absolute_url

# How often rank 0 may send a bar update (log steps are always sent), and how often the driver polls.
BAR_UPDATE_SECONDS = 0.5
POLL_SECONDS = 0.5
# With no worker started after this long, the driver says what it is waiting for (resources, most often).
WAITING_NOTICE_SECONDS = 120.0
# How long a stop (Ctrl-C, a worker's fatal error) lets Ray Train's controller abort the workers
# before the driver kills the controller, which takes its workers with it.
ABORT_SECONDS = 10.0
# Test-only fault injection (e.g. distill.trainer.KILL_AT_STEP_ENV): the driver's D2G_FAULT_*
# variables reach the workers, which on a cluster do not inherit the driver's environment.
FAULT_ENV_PREFIX = "D2G_FAULT_"


class RayRunFailed(TrainingStopped):
    """A Ray Train run ended without finishing: a worker's error that a restart cannot fix, or more
    worker-group failures than max_failures. The message is the one line to show."""


def train_in_process(config: TrainConfig, progress: bool = True) -> dict:
    """Train as a single rank in this process; returns the run summary (TrainSummary.as_dict)."""
    return Trainer(config).run(progress=progress).as_dict()


class ProgressInbox:
    """A Ray actor (no CPU) between the workers and the driver: they push events in order, the
    driver drains them. Events: {"kind": "launched", "world_size"} from rank 0 when a worker group
    starts, {"kind": "worker", "rank", "node"} from every rank, {"kind": "step", "step", "rates",
    "logs", "log_line"} and {"kind": "closed"} from rank 0, and {"kind": "fatal", "message"} from a
    rank that stops with an error a restart cannot fix."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        """Queue one event."""
        self.events.append(event)

    def drain(self) -> list[dict]:
        """Every event queued since the last drain, oldest first."""
        events, self.events = self.events, []
        return events


class RemoteProgress:
    """Rank 0's ProgressSink on Ray Train: forwards steps to the driver's ProgressInbox without
    waiting (fire-and-forget actor calls keep their order).

    Args:
        inbox: the driver's ProgressInbox actor handle.
        bar: the driver shows a bar: send a step at most every BAR_UPDATE_SECONDS besides the log
            steps (without a bar, only the log steps are sent).
    """

    def __init__(self, inbox: Any, bar: bool):
        self.inbox, self.bar = inbox, bar
        self._last_sent = 0.0

    def update(self, step: int, rates: dict, logs: dict, log_line: bool) -> None:
        """Send the step to the driver if it logs, or if the driver's bar is due a refresh."""
        now = time.monotonic()
        if log_line or (self.bar and now - self._last_sent >= BAR_UPDATE_SECONDS):
            self._last_sent = now
            self.inbox.push.remote({"kind": "step", "step": step, "rates": rates, "logs": logs,
                                    "log_line": log_line})

    def close(self) -> None:
        """Wait until the driver's inbox holds every update sent (a worker may exit right after)."""
        import ray

        try:
            ray.get(self.inbox.push.remote({"kind": "closed"}), timeout=30)
        except Exception:  # progress is a courtesy: it must never turn a finished run into a failure
            pass


def node_label() -> str:
    """This Ray worker's node as a person can find it: its IP and short node id."""
    import ray

    return f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()[:12]})"


def _worker_loop(loop_config: dict) -> None:
    import ray.train

    from d2g.cli.quiet import quiet_third_party
    from d2g.teacher.loading import TeacherError
    from distill.objectives import ObjectiveError

    # Cluster workers do not inherit the driver's environment: -v travels in the loop config.
    quiet_third_party(loop_config["verbose"])
    os.environ.update(loop_config.get("fault_env", {}))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    inbox = loop_config.get("progress_inbox")
    sink = None
    if inbox is not None:
        if rank == 0:
            inbox.push.remote({"kind": "launched", "world_size": world_size})
            sink = RemoteProgress(inbox, loop_config["bar"])
        inbox.push.remote({"kind": "worker", "rank": rank, "node": node_label()})
    config = TrainConfig(**loop_config["config"])
    try:
        # Before the teacher loads: a worker that cannot see the run's storage is told in seconds.
        check_worker_sees(config.data, config.out, loop_config["storage_token"])
        summary: TrainSummary = Trainer(config, rank, world_size).run(progress=False, sink=sink)
    except (SharedStorageError, TrainingStopped, TeacherError, ObjectiveError) as err:
        # The same on every restart (a bad teacher or objective too): the driver stops the run
        # instead of Ray Train retrying it --max-failures times.
        if inbox is not None:
            try:
                ray.get(inbox.push.remote({"kind": "fatal", "message": str(err)}), timeout=30)
            except Exception:  # the driver then reports the failure from Ray Train's error instead
                pass
        raise
    ray.train.report({"steps": summary.steps})


class _RunControl:
    """The driver's hold on a running Ray Train run: its controller actor (recorded when fit()
    creates it), a fatal worker error if one came, and `stop`."""

    def __init__(self) -> None:
        self.controller: Any = None
        self.fatal: str | None = None
        self.stopped = False

    def stop(self) -> None:
        """Abort the run: Ray Train's controller stops the worker group; a controller that does not
        finish within ABORT_SECONDS is killed, and its workers (its actors) with it."""
        import ray

        self.stopped = True
        if self.controller is None:
            return
        try:
            ray.wait([self.controller.abort.remote()], timeout=ABORT_SECONDS)
        except Exception:  # already gone: nothing to stop
            pass
        try:
            ray.kill(self.controller, no_restart=True)
        except Exception:
            pass


def _stoppable_trainer(control: _RunControl, **kwargs: Any) -> Any:
    """A TorchTrainer whose controller `control` holds, and without Ray Train's SIGINT handler
    (which wants three Ctrl-Cs and then exits 0): Ctrl-C raises KeyboardInterrupt in fit(), and
    train_on_ray stops the run."""
    from ray.train.torch import TorchTrainer

    class StoppableTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:  # Ray Train v2's hook, called by fit()
            control.controller = controller

    return StoppableTorchTrainer(**kwargs)


class _ProgressPoller(threading.Thread):
    """The driver's side: drains the inbox every POLL_SECONDS into a ProgressDisplay while
    trainer.fit() blocks the main thread; says when the worker group restarts, and what it waits
    for when no worker has started after WAITING_NOTICE_SECONDS; remembers each rank's node, and
    stops the run (`control`) when a worker reports an error that a restart cannot fix."""

    def __init__(self, inbox: Any, display: ProgressDisplay, config: TrainConfig, resources: dict,
                 control: _RunControl):
        super().__init__(name="d2g-train-progress", daemon=True)
        self.inbox, self.display, self.config, self.resources = inbox, display, config, resources
        self.control = control
        self.stopping = threading.Event()
        self.launches = 0
        self.nodes: dict[int, str] = {}
        self.began = time.monotonic()
        self.waiting_said = False
        self._lock = threading.Lock()

    def run(self) -> None:
        """Poll until `finish` is called."""
        while not self.stopping.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        """Show every event queued so far."""
        import ray

        with self._lock:  # the main thread's last poll (finish) and this thread's must not interleave
            try:
                events = ray.get(self.inbox.drain.remote(), timeout=30)
            except Exception:  # a slow or lost poll only delays the bar; fit() reports real failures
                return
            for event in events:
                self._show(event)
        if not self.launches and not self.waiting_said and time.monotonic() - self.began > WAITING_NOTICE_SECONDS:
            self.waiting_said = True
            self.display.message(
                f"distill: no training worker has started after {WAITING_NOTICE_SECONDS:.0f} s; Ray Train waits for "
                f"{self.config.min_workers or self.config.workers} worker(s) with {self.resources} each (`ray status` shows what the cluster "
                "has free; -v shows Ray's own messages)")

    def _show(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "launched":
            self.launches += 1
            if self.launches > 1:
                self.display.message(
                    f"distill: Ray Train restarted the worker group on {event.get('world_size', '?')} worker(s) "
                    f"(start {self.launches} of this run); {_restart_point(self.config)}",
                    logging.WARNING)
        elif kind == "worker":
            self.nodes[event["rank"]] = event["node"]
        elif kind == "step":
            self.display.update(event["step"], event["rates"], event["logs"], event["log_line"])
        elif kind == "fatal" and self.control.fatal is None:
            self.control.fatal = event["message"]
            self.control.stop()

    def finish(self) -> None:
        """Stop polling and show the last events (the final step's line); may be called again."""
        self.stopping.set()
        if self.is_alive():
            self.join()
        self.poll()


def _latest_step(config: TrainConfig) -> int | None:
    from distill.checkpoint import CheckpointStore

    try:
        return CheckpointStore(config.out).latest()
    except Exception:  # a listing that fails here is not the news; the line must still be printed
        return None


def _restart_point(config: TrainConfig) -> str:
    latest = _latest_step(config)
    if latest is None:
        return f"starting at step 0: no complete checkpoint yet in {config.out}"
    return f"resuming from step {latest}, the latest complete checkpoint in {config.out}"


def _latest_checkpoint(config: TrainConfig) -> str:
    """Where a re-run resumes: `the latest complete checkpoint is step N in OUT`, or none yet."""
    latest = _latest_step(config)
    if latest is None:
        return f"no complete checkpoint yet in {config.out} (a re-run starts at step 0)"
    return f"the latest complete checkpoint is step {latest} in {config.out}"


def resume_command() -> str:
    """The command that resumes the run: this very `distill train` command line (resuming is its
    default), or a description when train() was called from a program other than the CLI."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program == "distill" or sys.argv[0].endswith(os.path.join("distill", "cli.py")):
        return shlex.join(["distill", *sys.argv[1:]])
    return "the same distill train command"


def _failure_reason(err: BaseException) -> str:
    """What went wrong in a worker, in a few words: Ray's accounts of a dead actor are long."""
    text = str(err)
    if "node has died" in text or "node died" in text:
        return "its node was lost"
    if "worker process has died" in text or "died unexpectedly" in text:
        return "its process died (killed: by a signal, out of memory, or a crash)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "health check failed" not in line and "Error Snippet" not in line] or lines
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _describe_failure(err: BaseException, config: TrainConfig, nodes: dict[int, str]) -> str:
    """One line for a run Ray Train gave up on: what failed, on which node, where to resume, how."""
    failures: dict = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, first = min(failures.items())
        where = f" on node {nodes[rank]}" if rank in nodes else ""
        others = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
        what = f"training worker rank {rank}{where} failed{others}: {_failure_reason(first)}"
    else:
        cause = getattr(err, "controller_failure", None) or err
        what = f"Ray Train failed: {_failure_reason(cause)}"
    return (f"{what}; Ray Train gave up after {config.max_failures} restart(s) (--max-failures); "
            f"{_latest_checkpoint(config)}; resume with: {resume_command()} (-v shows the traceback)")


def train_on_ray(config: TrainConfig, progress: bool = True) -> dict:
    """Train on Ray Train: `config.workers` ranks (a GPU each with use_gpu, default: when the
    cluster has GPUs), joining RAY_ADDRESS or a local Ray. Rank 0's progress is shown here, once
    (`progress`: a bar on a terminal). Returns rank 0's run summary. Raises RayRunFailed when the
    run cannot finish, KeyboardInterrupt (with the line to show) after stopping it on Ctrl-C."""
    from d2g.cli.quiet import is_verbose
    from d2g.cli.ray_start import ensure_ray

    verbose = is_verbose()
    # Workers' stdout/stderr (Ray Train's banners, a tqdm refresh per line, warnings) only with -v.
    ray = ensure_ray(worker_logs=verbose)
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    try:
        from ray.train import TrainingFailedError
    except ImportError:  # Ray Train v1
        TrainingFailedError = RuntimeError  # noqa: N806

    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Elastic (min_workers < workers): Ray Train starts on what fits between the two, restarts on
    # fewer workers after a loss and on more when they fit again; every start resumes from --out's
    # latest checkpoint with the run's global batch (Trainer), so the data order carries over exactly.
    low = config.min_workers or config.workers
    elastic = low < config.workers
    scaling = ScalingConfig(num_workers=(low, config.workers) if elastic else config.workers, use_gpu=use_gpu,
                            resources_per_worker=resources,
                            **({"elastic_resize_monitor_interval_s": config.elastic_resize_seconds} if elastic else {}))
    run_options: dict = {}
    try:
        from ray.train import LoggingConfig  # Ray Train v2

        # Ray Train's INFO banners ("Requesting resources", "Started training worker group", ...) stay
        # in its session log files unless -v, also when this process joined a Ray that forwards logs.
        run_options["logging_config"] = LoggingConfig(log_level="INFO" if verbose else "WARNING")
    except ImportError:
        pass
    # Ray's own storage only receives the final report; checkpoints are ours, in --out. A local --out
    # holds it too (RUN/ray_train); for an object-store --out it is a temporary folder, removed after.
    local_out = "://" not in config.out
    storage = os.environ.get("D2G_RAY_STORAGE") or (
        os.path.join(config.out, "ray_train") if local_out else tempfile.mkdtemp(prefix="d2g-ray-train-"))
    name = f"distill-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    # On the driver's node: an inbox on a worker node would be lost with that node (and with it every
    # progress line and the restart notice), while the run itself survives on the other nodes. Not
    # soft: a soft affinity put it on a worker node at times (a head without CPUs, simulated cluster),
    # and the driver's node lives as long as the driver; the inbox needs no resources there.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    inbox = ray.remote(num_cpus=0)(ProgressInbox).options(scheduling_strategy=here).remote()
    display = ProgressDisplay(config.max_steps, desc=f"distill {config.objective}", bar=progress)
    # Each worker reads this token back from --out: proof that it sees the driver's --out.
    token = leave_marker(config.out)
    loop_config = {"config": config.model_dump(mode="json"), "verbose": verbose, "progress_inbox": inbox,
                   "bar": display.bar_wanted, "storage_token": token,
                   "fault_env": {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}}
    control = _RunControl()
    trainer = _stoppable_trainer(control, train_loop_per_worker=_worker_loop, train_loop_config=loop_config,
                                 scaling_config=scaling,
                                 run_config=RunConfig(storage_path=storage, name=name, **run_options,
                                                      failure_config=FailureConfig(max_failures=config.max_failures)))
    poller = _ProgressPoller(inbox, display, config, resources, control)
    poller.start()
    try:
        trainer.fit()
        poller.finish()
        if control.fatal:
            raise RayRunFailed(control.fatal)
    except KeyboardInterrupt:
        control.stop()
        raise KeyboardInterrupt(f"interrupted; the training workers are stopped; {_latest_checkpoint(config)}; "
                                f"resume with: {resume_command()}") from None
    except Exception as err:
        poller.finish()  # the last events: a worker's own account of its failure may have just arrived
        if control.fatal:
            raise RayRunFailed(control.fatal) from err
        if isinstance(err, TrainingFailedError):
            raise RayRunFailed(_describe_failure(err, config, poller.nodes)) from err
        raise
    finally:
        poller.finish()
        display.close()
        ray.kill(inbox)
        remove_marker(config.out, token)
        if not local_out and "D2G_RAY_STORAGE" not in os.environ:
            shutil.rmtree(storage, ignore_errors=True)
    # Ray keeps only checkpoint-attached metrics; rank 0 wrote the run summary into --out.
    from distill.metrics import MetricsWriter

    return MetricsWriter(config.out, enabled=False).read_json("summary.json")


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train as `config` says: on Ray Train (use_ray), else in this process (one worker only).
    Relative local --data and --out are made absolute first (Ray workers do not run in the user's
    working directory). `progress`: a bar where stderr is a terminal; plain progress lines every
    log_every steps either way when there is no bar. Returns the run summary as a dict."""
    config = config.model_copy(update={"data": absolute_url(config.data), "out": absolute_url(config.out)})
    config = config.model_copy(update={"teacher": absolute_teacher(config.teacher)})
    weights = config.objective_config.regression_kwargs.get("weights")
    if weights is not None and os.path.exists(str(weights)):
        config.objective_config.regression_kwargs = {**config.objective_config.regression_kwargs,
                                                     "weights": os.path.abspath(str(weights))}
    config.check_inputs()
    if config.use_ray:
        from d2g.cli.ray_start import check_ray_address

        check_ray_address(os.environ.get("RAY_ADDRESS", ""))
        return train_on_ray(config, progress)
    if config.workers != 1:
        raise TrainConfigError(f"--workers {config.workers} needs Ray (drop --no-ray, or use --workers 1)")
    return train_in_process(config, progress)
