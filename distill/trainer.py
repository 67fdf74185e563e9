"""The training loop: stream pairs from the store, train the student, checkpoint, resume exactly.

One process per rank. Distributed runs (Ray Train sets up torch.distributed) average gradients
with one flat all-reduce per model after backward: explicit, and indifferent to the GAN's
switching of which parameters train in which phase. With --fsdp the generator, discriminator and
EMA are sharded instead (distill.fsdp): FSDP reduce-scatters the gradients in backward, and
checkpoints are gathered back into the same unsharded format. Latents are never decoded here except for
the optional preview grid.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import xxhash

from d2g.teacher.loading import load_teacher, pick_device
from distill import fsdp
from distill.checkpoint import CheckpointStore
from distill.ema import EMA
from distill.metrics import MetricsWriter, ProgressDisplay, ProgressSink
from distill.objectives import NonFiniteLossError, make_objective
from distill.train_config import TrainConfig
from store import (
    INDEX,
    LATENT,
    NOISE,
    POOLED_PROMPT_EMBEDS,
    PROMPT,
    PROMPT_EMBEDS,
    PairDataset,
    PairLoader,
    PairStore,
    parse_url,
)

WEIGHT_GROUPS = ("generator", "ema", "discriminator")
# Test-only fault injection: the process SIGKILLs itself right after this step, as a lost node would.
KILL_AT_STEP_ENV = "D2G_FAULT_KILL_TRAIN_AT_STEP"
# Test-only: "STEP:PATH,...": after finishing STEP, wait until the file PATH exists (a test decides
# when training goes on, e.g. only once a node it added back has been taken into the run).
HOLD_AT_STEP_ENV = "D2G_FAULT_HOLD_TRAIN_AT_STEP"


def _maybe_die(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    for hold in filter(None, os.environ.get(HOLD_AT_STEP_ENV, "").split(",")):
        at, path = hold.split(":", 1)
        while int(at) == step and not os.path.exists(path):
            time.sleep(0.1)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""


def _data_order(per_rank: list[list[int]]) -> dict:
    """What the step read, compactly: a digest of the global batch's sample indices, every rank's in
    rank order (equal across runs iff the data order is, for any number of ranks: rank r reads the
    r-th slice of the global batch), and their range."""
    indices = [i for rank_indices in per_rank for i in rank_indices]
    digest = xxhash.xxh3_64_hexdigest(",".join(map(str, indices)).encode())
    return {"data/order_xxh3": digest, "data/index_min": min(indices), "data/index_max": max(indices)}


@dataclass
class TrainSummary:
    """What a run did: run folder `out`, last step `steps`, the step it `resumed_from`, wall time
    `seconds` and this process's CPU time `cpu_seconds` (which, unlike wall time, a machine shared
    with other work barely changes), `samples_seen` (all ranks), `last_logs` (the last logged losses), `data_version`,
    `skipped_shards` (corrupt ones), and `rank_weight_hashes`: each rank's generator weight digest
    (equal on every rank when DDP kept them in sync)."""

    out: str
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    samples_seen: int = 0
    last_logs: dict = field(default_factory=dict)
    data_version: int | None = None
    skipped_shards: dict = field(default_factory=dict)
    rank_weight_hashes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The fields and the steps per second of this session (resumed steps excluded)."""
        data = dict(self.__dict__)
        data["steps_per_second"] = (self.steps - (self.resumed_from or 0)) / self.seconds if self.seconds else 0.0
        return data


def weights_digest(module: torch.nn.Module, state: dict | None = None) -> str:
    """A short hash of a module's state dict (or of `state`, e.g. a gathered one): equal digests,
    equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted((module.state_dict() if state is None else state).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _trainable(module: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad] if module is not None else []


class Trainer:
    """One rank of a training run: builds the objective and optimisers, opens the pair store,
    resumes from the run's latest checkpoint, and trains (`run`).

    The global batch G = workers x batch_size x grad_accum is fixed at the run's first start and
    kept in its checkpoints: on w ranks each rank accumulates G / (batch_size x w) micro-batches per
    step, reading its slice of each global batch (PairDataset's global_batch mode). So a run resumed
    on another number of ranks (Ray Train restarting on the workers that are left) trains on the
    same global batches and ends, up to float summation order, with the uninterrupted run's weights.
    The RNG states of ranks that did not exist before are fresh deterministic seeds: an objective
    that draws random numbers (augmentation, re-noising) is then equal in distribution, not bitwise.

    Args:
        config: the run's options.
        rank, world_size: this process's place in a distributed run (torch.distributed must be
            initialised when world_size > 1; Ray Train does it).
    """

    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        if config.threads:
            torch.set_num_threads(config.threads)
        self._seed_everything(config.seed * 1000 + rank)
        self.device = pick_device(config.device)
        pipe = load_teacher(config.teacher, device=str(self.device), drop_t5=config.teacher_drop_t5)
        self.pipe = pipe
        self.objective = make_objective(config.objective, pipe, config.objective_config, data=config.data,
                                        memory=config.memory())
        self.generator = self.objective.generator
        self.discriminator = self.objective.discriminator
        if self.distributed:
            self._broadcast_parameters()
        # Made before sharding (an FSDP module cannot be deep-copied), then sharded like the generator.
        self.ema = EMA(self.generator, config.ema_decay) if config.ema_decay > 0 else None
        # FSDP on more than one rank only: an elastic run of an --fsdp config restarted on one
        # worker trains unsharded, from the same (unsharded) checkpoints.
        self.fsdp = config.fsdp and self.distributed
        if self.fsdp:  # the frozen teacher (self.pipe) stays whole on every rank: see distill.fsdp
            mesh = fsdp.device_mesh(world_size)
            fsdp.shard(self.generator, mesh)
            if self.discriminator is not None:
                # R1 differentiates through the discriminator's input gradient: see fsdp.shard.
                r1 = getattr(config.objective_config, "r1_gamma", 0) > 0
                fsdp.shard(self.discriminator, mesh, double_backward=r1)
            if self.ema is not None:
                fsdp.shard(self.ema.model, mesh, like=self.generator)
        self.g_params = _trainable(self.generator)
        self.d_params = _trainable(self.discriminator)
        adam = dict(betas=tuple(config.betas), weight_decay=config.weight_decay)
        self.opt_g = torch.optim.AdamW(self.g_params, lr=config.lr_g, **adam)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=config.lr_d, **adam) if self.d_params else None
        fp16 = config.amp == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        if config.compile:
            self.objective.generator = self.generator = torch.compile(self.generator)
        self.checkpoints = CheckpointStore(config.out)
        self.step = 0
        self.summary = TrainSummary(out=config.out)
        self.metrics = MetricsWriter(config.out, enabled=rank == 0)
        latest = self.checkpoints.latest()
        if latest is not None and not config.resume:
            raise TrainingStopped(f"{config.out} already holds checkpoints (latest: step {latest}); resume "
                                  "(the default) or choose a new --out: checkpoints are never overwritten")
        # The trainer's one handle on the pair store (manifests, new versions, preview prompts);
        # store.PairDataset takes a URL and keeps its own handle for reading samples.
        self.data_root, pinned = parse_url(config.data)
        self.store = PairStore(self.data_root)
        saved = self.checkpoints.load(latest, list(WEIGHT_GROUPS)) if latest is not None else None
        # The global batch of the run's first start. A checkpoint from before it was recorded read
        # contiguous rank ranges: it resumes that way, on its own number of ranks only.
        if saved is None:
            self.global_batch: int | None = config.workers * config.batch_size * config.grad_accum
        else:
            self.global_batch = saved[2].get("global_batch")
        self.micro_batches = self._micro_batches()
        # A resumed run reads the data version its checkpoint was streaming, whatever --data says.
        self._open_data(saved[2]["data_version"] if saved is not None else pinned)
        if saved is not None:
            self._restore(latest, *saved)

    # -- setup -----------------------------------------------------------------------------------
    def _micro_batches(self) -> int:
        """Micro-batches of batch_size per rank and step: global batch / (batch_size x ranks)."""
        c, big = self.config, self.global_batch
        if big is None:
            return c.grad_accum
        if big % (c.batch_size * self.world_size):
            raise TrainingStopped(
                f"the run's global batch of {big} pairs cannot be split into micro-batches of batch_size "
                f"{c.batch_size} on {self.world_size} ranks ({big} is not a multiple of {c.batch_size * self.world_size}); "
                f"use a number of ranks that divides {big // c.batch_size}" if big % c.batch_size == 0 else
                f"the run's global batch of {big} pairs is not a multiple of batch_size {c.batch_size}; keep the "
                "batch_size the run started with")
        return big // (c.batch_size * self.world_size)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _broadcast_parameters(self) -> None:
        # Every rank builds the same modules, but heads initialised at random must agree exactly.
        for module in (self.generator, self.discriminator):
            if module is not None:
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def _open_data(self, version: int | None) -> None:
        """Stream `version` of the pair store (None: the latest), with the stored text embeddings
        when the pairs have them."""
        c = self.config
        manifest = self.store.manifest(version)
        fields = [NOISE, LATENT, PROMPT]
        fields += [f for f in (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS) if f in manifest.schema.names]
        self.dataset = PairDataset(f"{self.data_root}@v{manifest.version}", fields=fields, seed=c.seed,
                                   shuffle_block=c.shuffle_block, rank=self.rank, world_size=self.world_size,
                                   on_corrupt=c.on_corrupt, global_batch=self.global_batch)
        self.loader = PairLoader(self.dataset, batch_size=c.batch_size, num_workers=c.data_workers, drop_last=True)
        self.summary.data_version = self.dataset.version

    # -- checkpoints -----------------------------------------------------------------------------
    def _gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def save_checkpoint(self) -> None:
        """Checkpoint the current step (rank 0 writes; every rank's RNG and data position are
        gathered into it), then prune old checkpoints. Every rank must call it."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        all_rng = self._gather(rng)
        all_data = self._gather(self.dataset.state_dict())
        tensors = self._checkpoint_tensors()
        if self.rank == 0:
            weights, optimizers = tensors
            objects = {**optimizers, "scaler_g": self.scaler_g.state_dict(),
                       "scaler_d": self.scaler_d.state_dict(),
                       "rng_torch": [r["torch"] for r in all_rng],
                       "rng_cuda": [r.get("cuda") for r in all_rng if r.get("cuda") is not None]}
            state = {"step": self.step, "world_size": self.world_size, "global_batch": self.global_batch,
                     "data": all_data,
                     "data_url": self.config.data, "data_version": self.dataset.version,
                     "rng_python": [_python_state_to_json(r["python"]) for r in all_rng],
                     "config": self.config.model_dump(mode="json"), "samples_seen": self.summary.samples_seen}
            self.checkpoints.save(self.step, weights, objects, state)
            self.checkpoints.prune(self.config.keep_checkpoints)
        if self.distributed:
            dist.barrier()

    def _checkpoint_tensors(self) -> tuple[dict, dict] | None:
        """The weights ({"generator", "ema", "discriminator"}) and optimiser states ({"opt_g",
        "opt_d"}) to checkpoint, unsharded, on rank 0 (None elsewhere). Under FSDP every rank takes
        part in gathering them."""
        keep = self.rank == 0
        if not keep and not self.fsdp:
            return None
        modules = {"generator": self.generator, "ema": self.ema, "discriminator": self.discriminator}
        optimizers = {"opt_g": self.opt_g, "opt_d": self.opt_d}
        weights = {k: m.state_dict() for k, m in modules.items() if m is not None}
        if self.fsdp:
            weights = {k: fsdp.full_state_dict(state, keep) for k, state in weights.items()}
            states = {k: fsdp.full_optimizer_state(o, keep) for k, o in optimizers.items() if o is not None}
        else:
            states = {k: o.state_dict() for k, o in optimizers.items() if o is not None}
        return (weights, states) if keep else None

    def _load_module(self, module: torch.nn.Module | EMA, state: dict) -> None:
        model = module.model if isinstance(module, EMA) else module
        module.load_state_dict(fsdp.shard_state_dict(state, model) if self.fsdp else state)

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, params: list, state: dict) -> None:
        optimizer.load_state_dict(fsdp.shard_optimizer_state(state, params) if self.fsdp else state)

    def _restore(self, step: int, weights: dict, objects: dict, state: dict) -> None:
        saved_world = state["world_size"]
        if saved_world != self.world_size and self.global_batch is None:
            raise TrainingStopped(f"checkpoint step {step} in {self.config.out} was written by {saved_world} ranks "
                                  "before runs recorded their global batch; resume it with "
                                  f"{saved_world} ranks")
        self._load_module(self.generator, weights["generator"])
        if self.ema is not None and "ema" in weights:
            self._load_module(self.ema, weights["ema"])
        if self.discriminator is not None and "discriminator" in weights:
            self._load_module(self.discriminator, weights["discriminator"])
        self._load_optimizer(self.opt_g, self.g_params, objects["opt_g"])
        if self.opt_d is not None and "opt_d" in objects:
            self._load_optimizer(self.opt_d, self.d_params, objects["opt_d"])
        # The config's learning rates win over the checkpoint's: changing them on resume is deliberate.
        for optimizer, lr in ((self.opt_g, self.config.lr_g), (self.opt_d, self.config.lr_d)):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr
        self.scaler_g.load_state_dict(objects["scaler_g"])
        self.scaler_d.load_state_dict(objects["scaler_d"])
        if saved_world == self.world_size:
            self.dataset.load_state_dict(state["data"][self.rank])
        else:  # elastic resume: the epoch continues at the next global batch, split over our ranks
            self.dataset.load_state_dict(PairDataset.merge_states(state["data"]))
        if self.rank < saved_world:
            torch.set_rng_state(objects["rng_torch"][self.rank])
            if objects.get("rng_cuda") and torch.cuda.is_available() and self.rank < len(objects["rng_cuda"]):
                torch.cuda.set_rng_state(objects["rng_cuda"][self.rank])
            random.setstate(_python_state_from_json(state["rng_python"][self.rank]))
        else:  # a rank the checkpoint did not have: a fresh seed, fixed by (seed, rank, step)
            fresh = xxhash.xxh3_64_intdigest(f"{self.config.seed}/{self.rank}/{step}".encode()) % 2**63
            self._seed_everything(fresh)
        self.step = state["step"]
        self.summary.resumed_from = step
        self.summary.samples_seen = state.get("samples_seen", 0)

    # -- the loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.distributed or not params or self.fsdp:  # FSDP reduce-scattered them in backward
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).clone()
            offset += n

    def _optimise(self, loss_fn, micro_batches, params, optimizer, scaler) -> dict:
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        # Every micro-batch holds batch_size pairs (drop_last) and every rank as many of them, so the
        # 1 / len(micro_batches) here and the mean over ranks in _sync_gradients average the per-pair
        # gradient over the whole global batch, whatever the number of ranks.
        for batch in micro_batches:
            with self._autocast():
                loss, part = loss_fn(batch, self.step)
            scaler.scale(loss / len(micro_batches)).backward()
            for k, v in part.items():
                logs[k] = logs.get(k, 0.0) + v / len(micro_batches)
        self._sync_gradients(params)
        if self.fsdp:  # units that keep their gathered weights after backward (fsdp.shard) free them now
            fsdp.reshard(self.generator)
            fsdp.reshard(self.discriminator)
        scaler.unscale_(optimizer)
        if self.config.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
            logs[f"{'g' if optimizer is self.opt_g else 'd'}/grad_norm"] = float(norm)
        scaler.step(optimizer)
        scaler.update()
        return logs

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimiser step of the discriminator (if any), then of the generator, over the
        accumulated micro-batches; updates the EMA. Returns the averaged logs."""
        logs: dict[str, float] = {}
        if self.opt_d is not None:
            logs.update(self._optimise(self.objective.discriminator_loss, micro_batches, self.d_params,
                                       self.opt_d, self.scaler_d))
        logs.update(self._optimise(self.objective.generator_loss, micro_batches, self.g_params,
                                   self.opt_g, self.scaler_g))
        if self.ema is not None:
            self.ema.update(self.generator)
        return logs

    def _batches(self):
        """Micro-batches forever, epoch after epoch; a newer dataset version (when --data names no
        version) is picked up at an epoch boundary, the same one on every rank."""
        while True:
            yield from self.loader
            self._maybe_follow_latest()

    def _maybe_follow_latest(self) -> None:
        if parse_url(self.config.data)[1] is not None:
            return
        latest = self.store.latest_version() if self.rank == 0 else None
        if self.distributed:
            shared = [latest]
            dist.broadcast_object_list(shared, src=0)
            latest = shared[0]
        if latest is not None and latest != self.dataset.version:
            epoch = self.dataset.epoch
            self._open_data(latest)
            self.dataset.set_epoch(epoch)

    def _mean_over_ranks(self, logs: dict) -> dict:
        """The logs averaged over the ranks: each rank's are the means over its equal share of the
        global batch, so this is the global batch's mean, the same for any number of ranks."""
        if not self.distributed:
            return logs
        every = self._gather(logs)
        return {k: sum(r[k] for r in every if k in r) / sum(k in r for r in every) for k in logs}

    def _all_ranks_have(self, have: bool) -> bool:
        if not self.distributed:
            return have
        flag = torch.tensor([1 if have else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _rates(self, began: float, steps_done: int) -> dict:
        """Learning rates and throughput since this process started training."""
        seconds = max(time.perf_counter() - began, 1e-9)
        rates = {"lr/g": self.opt_g.param_groups[0]["lr"], "time/steps_per_second": steps_done / seconds,
                 "time/samples_per_second": steps_done * self.config.batch_size * self.micro_batches
                 * self.world_size / seconds}
        if self.opt_d is not None:
            rates["lr/d"] = self.opt_d.param_groups[0]["lr"]
        return rates

    def run(self, progress: bool = True, sink: ProgressSink | None = None) -> TrainSummary:
        """Train until config.max_steps, logging, previewing and checkpointing on schedule. Raises
        TrainingStopped on a non-finite loss.

        Args:
            progress: on rank 0 without a `sink`: a bar if stderr is a terminal (False: never a
                bar); plain progress lines every log_every steps otherwise (distill.metrics).
            sink: where this rank sends its progress instead (a Ray Train worker sends it to the
                driver, which shows one bar for the run); every rank may have one.
        """
        c = self.config
        began, began_cpu = time.perf_counter(), time.process_time()
        batches = self._batches()
        if sink is None and self.rank == 0:
            sink = ProgressDisplay(c.max_steps, desc=f"distill {c.objective}", bar=progress)
        first_step = self.step
        try:
            while self.step < c.max_steps:
                micro = [next(batches) for _ in range(self.micro_batches)]
                if not self._all_ranks_have(True):
                    break
                try:
                    logs = self.train_step(micro)
                except NonFiniteLossError as err:
                    raise TrainingStopped(f"{err}; stopped at step {self.step}, last good checkpoint: "
                                          f"step {self.checkpoints.latest()} in {c.out}") from err
                self.step += 1
                self.summary.samples_seen += sum(len(b[PROMPT]) for b in micro) * self.world_size
                self.summary.last_logs = logs
                log_step = self.step % c.log_every == 0 or self.step == c.max_steps
                rates = self._rates(began, self.step - first_step)
                if log_step:  # every rank takes part: losses and indices of the whole global batch
                    logs = self._mean_over_ranks(logs)
                    self.summary.last_logs = logs
                    order = _data_order(self._gather([int(i) for batch in micro for i in batch[INDEX]]))
                    self.metrics.log(self.step, {**logs, **rates, **order})
                if sink is not None:
                    sink.update(self.step, rates, {k: v for k, v in logs.items() if k.endswith("total")}, log_step)
                if c.preview_every and self.step % c.preview_every == 0 and self.rank == 0:
                    from distill.preview import write_preview

                    write_preview(self, self.step)
                if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                    self.save_checkpoint()
                    self.metrics.flush()
                _maybe_die(self.step)
        finally:
            if sink is not None:
                sink.close()
            self.metrics.flush()
        self.summary.steps = self.step
        self.summary.seconds = time.perf_counter() - began
        self.summary.cpu_seconds = time.process_time() - began_cpu
        self.summary.skipped_shards = dict(self.dataset.skipped)
        whole = fsdp.full_state_dict(self.generator.state_dict(), keep=True) if self.fsdp else None
        self.summary.rank_weight_hashes = self._gather(weights_digest(self.generator, whole))
        if self.rank == 0:
            self.metrics.write_json("summary.json", self.summary.as_dict())
        return self.summary


def _python_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
