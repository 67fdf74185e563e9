"""Run the trainer on Ray Train (TorchTrainer: one process per rank, DDP process group set up by
Ray: gloo on CPU, NCCL on GPUs), or in this process without Ray.

What a Ray Train run shows, quiet by default and loud on request: rank 0 sends its progress to a
small actor (`ProgressInbox`) that the driver polls, and the driver renders it exactly as an
in-process run does (one bar on a terminal, else a plain line every log_every steps with rate and
ETA), plus a line when Ray Train restarts the worker group. Ray's own output (worker stdout/stderr,
Ray Train's banners, library warnings inside workers) reaches the terminal only with -v; it is
always in the Ray session's log files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from distill.metrics import ProgressDisplay
from distill.train_config import TrainConfig, TrainConfigError
from distill.trainer import Trainer, TrainSummary
from store import absolute_url

# How often rank 0 may send a bar update (log steps are always sent), and how often the driver polls.
BAR_UPDATE_SECONDS = 0.5
POLL_SECONDS = 0.5
# With no worker started after this long, the driver says what it is waiting for (resources, most often).
WAITING_NOTICE_SECONDS = 120.0


def train_in_process(config: TrainConfig, progress: bool = True) -> dict:
    """Train as a single rank in this process; returns the run summary (TrainSummary.as_dict)."""
    return Trainer(config).run(progress=progress).as_dict()


class ProgressInbox:
    """A Ray actor (no CPU) between rank 0 and the driver: rank 0 pushes events in order, the
    driver drains them. Events: {"kind": "launched"} when a worker group starts, {"kind": "step",
    "step", "rates", "logs", "log_line"} and {"kind": "closed"}."""

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


def _worker_loop(loop_config: dict) -> None:
    import ray.train

    from d2g.cli.quiet import quiet_third_party

    # Cluster workers do not inherit the driver's environment: -v travels in the loop config.
    quiet_third_party(loop_config["verbose"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    inbox = loop_config.get("progress_inbox")
    sink = None
    if rank == 0 and inbox is not None:
        inbox.push.remote({"kind": "launched"})
        sink = RemoteProgress(inbox, loop_config["bar"])
    config = TrainConfig(**loop_config["config"])
    summary: TrainSummary = Trainer(config, rank, context.get_world_size()).run(progress=False, sink=sink)
    ray.train.report({"steps": summary.steps})


class _ProgressPoller(threading.Thread):
    """The driver's side: drains the inbox every POLL_SECONDS into a ProgressDisplay while
    trainer.fit() blocks the main thread; says when the worker group restarts, and what it waits
    for when no worker has started after WAITING_NOTICE_SECONDS."""

    def __init__(self, inbox: Any, display: ProgressDisplay, config: TrainConfig, resources: dict):
        super().__init__(name="d2g-train-progress", daemon=True)
        self.inbox, self.display, self.config, self.resources = inbox, display, config, resources
        self.stopping = threading.Event()
        self.launches = 0
        self.began = time.monotonic()
        self.waiting_said = False

    def run(self) -> None:
        """Poll until `finish` is called."""
        while not self.stopping.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        """Show every event queued so far."""
        import ray

        try:
            events = ray.get(self.inbox.drain.remote(), timeout=30)
        except Exception:  # a slow or lost poll only delays the bar; fit() reports real failures
            return
        for event in events:
            if event["kind"] == "launched":
                self.launches += 1
                if self.launches > 1:
                    self.display.message(
                        f"distill: Ray Train restarted the worker group (attempt {self.launches} of at most "
                        f"{self.config.max_failures + 1}); resuming from the latest complete checkpoint in "
                        f"{self.config.out}", logging.WARNING)
            elif event["kind"] == "step":
                self.display.update(event["step"], event["rates"], event["logs"], event["log_line"])
        if not self.launches and not self.waiting_said and time.monotonic() - self.began > WAITING_NOTICE_SECONDS:
            self.waiting_said = True
            self.display.message(
                f"distill: no training worker has started after {WAITING_NOTICE_SECONDS:.0f} s; Ray Train waits for "
                f"{self.config.min_workers or self.config.workers} worker(s) with {self.resources} each (`ray status` shows what the cluster "
                "has free; -v shows Ray's own messages)")

    def finish(self) -> None:
        """Stop polling and show the last events (the final step's line)."""
        self.stopping.set()
        self.join()
        self.poll()


def train_on_ray(config: TrainConfig, progress: bool = True) -> dict:
    """Train on Ray Train: `config.workers` ranks (a GPU each with use_gpu, default: when the
    cluster has GPUs), joining RAY_ADDRESS or a local Ray. Rank 0's progress is shown here, once
    (`progress`: a bar on a terminal). Returns rank 0's run summary."""
    from d2g.cli.quiet import is_verbose
    from d2g.cli.ray_start import ensure_ray

    verbose = is_verbose()
    # Workers' stdout/stderr (Ray Train's banners, a tqdm refresh per line, warnings) only with -v.
    ray = ensure_ray(worker_logs=verbose)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    # progress line and the restart notice), while the run itself survives on the other nodes.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    inbox = ray.remote(num_cpus=0)(ProgressInbox).options(scheduling_strategy=here).remote()
    display = ProgressDisplay(config.max_steps, desc=f"distill {config.objective}", bar=progress)
    loop_config = {"config": config.model_dump(mode="json"), "verbose": verbose, "progress_inbox": inbox,
                   "bar": display.bar_wanted}
    trainer = TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=RunConfig(storage_path=storage, name=name, **run_options,
                                                failure_config=FailureConfig(max_failures=config.max_failures)))
    poller = _ProgressPoller(inbox, display, config, resources)
    poller.start()
    try:
        trainer.fit()
    finally:
        poller.finish()
        display.close()
        ray.kill(inbox)
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
