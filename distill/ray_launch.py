"""Run the trainer on Ray Train (TorchTrainer: one process per rank, DDP process group set up by
Ray: gloo on CPU, NCCL on GPUs), or in this process without Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from distill.train_config import TrainConfig, TrainConfigError
from distill.trainer import Trainer, TrainSummary
from store import absolute_url


def train_in_process(config: TrainConfig, progress: bool = True) -> dict:
    """Train as a single rank in this process; returns the run summary (TrainSummary.as_dict)."""
    return Trainer(config).run(progress=progress).as_dict()


def _worker_loop(config_dict: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    config = TrainConfig(**config_dict)
    summary: TrainSummary = Trainer(config, context.get_world_rank(), context.get_world_size()).run(
        progress=context.get_world_rank() == 0)
    ray.train.report({"steps": summary.steps})


def train_on_ray(config: TrainConfig) -> dict:
    """Train on Ray Train: `config.workers` ranks (a GPU each with use_gpu, default: when the
    cluster has GPUs), joining RAY_ADDRESS or a local Ray. Returns rank 0's run summary."""
    from d2g.cli.ray_start import ensure_ray

    ray = ensure_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    scaling = ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    # Ray's own storage only receives the final report; checkpoints are ours, in --out. A local --out
    # holds it too (RUN/ray_train); for an object-store --out it is a temporary folder, removed after.
    local_out = "://" not in config.out
    storage = os.environ.get("D2G_RAY_STORAGE") or (
        os.path.join(config.out, "ray_train") if local_out else tempfile.mkdtemp(prefix="d2g-ray-train-"))
    name = f"distill-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(_worker_loop, train_loop_config=config.model_dump(mode="json"), scaling_config=scaling,
                           run_config=RunConfig(storage_path=storage, name=name,
                                                failure_config=FailureConfig(max_failures=config.max_failures)))
    try:
        trainer.fit()
    finally:
        if not local_out and "D2G_RAY_STORAGE" not in os.environ:
            shutil.rmtree(storage, ignore_errors=True)
    # Ray keeps only checkpoint-attached metrics; rank 0 wrote the run summary into --out.
    from distill.metrics import MetricsWriter

    return MetricsWriter(config.out, enabled=False).read_json("summary.json")


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train as `config` says: on Ray Train (use_ray), else in this process (one worker only).
    Relative local --data and --out are made absolute first (Ray workers do not run in the user's
    working directory). Returns the run summary as a dict."""
    config = config.model_copy(update={"data": absolute_url(config.data), "out": absolute_url(config.out)})
    weights = config.objective_config.regression_kwargs.get("weights")
    if weights is not None and os.path.exists(str(weights)):
        config.objective_config.regression_kwargs = {**config.objective_config.regression_kwargs,
                                                     "weights": os.path.abspath(str(weights))}
    config.check_inputs()
    if config.use_ray:
        return train_on_ray(config)
    if config.workers != 1:
        raise TrainConfigError(f"--workers {config.workers} needs Ray (drop --no-ray, or use --workers 1)")
    return train_in_process(config, progress)
