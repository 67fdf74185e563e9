"""The training config: every option of `distill train`, from YAML and/or flags, validated up front."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from d2g.cli.options import build_model
from distill.objective_config import (
    DEFAULT_LORA_TARGETS,
    LATENT_LPIPS_LOSSES,
    LORA_DISCRIMINATOR_OBJECTIVES,
    OBJECTIVE_CONFIGS,
    PACKAGED_LPIPS,
    PACKAGED_LPIPS_FOR_TEACHER,
    PACKAGED_PIXEL_LPIPS_FOR_TEACHER,
    LoRASettings,
    MemoryOptions,
    ObjectiveConfig,
    ObjectiveName,
    parse_objective_config,
)

GradCheckpointing = Literal["none", "generator", "discriminator", "both"]


class TrainConfigError(ValueError):
    """A bad option; the message names the field (and the config file, when there is one)."""


def check_local_out_folder(url: str, flag: str = "--out") -> None:
    """Raise TrainConfigError, naming `flag` and the path, if the local folder `url` could not be
    created or written: a file where a folder is needed (at `url` or on the way to it), or a
    read-only or non-writable folder. Checks only, creates nothing; object-store URLs are left to
    their first write (a permission there can only be known by trying)."""
    if "://" in url and not url.startswith("file://"):
        return
    path = os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)
    existing = path
    while not os.path.exists(existing) and not os.path.islink(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == path else f"; {existing} is a file"
        raise TrainConfigError(f"{flag} {url}: Not a directory{where} (give a folder; nothing was written)")
    if not os.access(existing, os.W_OK | os.X_OK):
        # access() says EROFS even to root; statvfs tells a read-only mount from missing permissions.
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        reason = "Read-only file system" if read_only else "Permission denied"
        raise TrainConfigError(f"{flag} {url}: {reason}: {existing} (nothing was written)")


class TrainConfig(BaseModel):
    """Every option of `distill train`. `objective_config` is parsed here, once, into the typed
    config of `objective` (see distill.objective_config); a checkpoint's saved config (its
    `model_dump(mode="json")`) parses back to an equal TrainConfig."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field("demo-out/pairs", description="pair store URL[@vN]; without @vN a newer version is picked up at epoch boundaries")
    teacher: str = Field("shapes", description="the teacher the pairs came from: hub id, local folder, or built-in alias")
    teacher_drop_t5: bool = Field(False, description="SD3 teachers: load the teacher without its T5 encoder, as "
                                  "pairgen --drop-t5 made the pairs (the export then has no T5 either)")
    out: str = Field("runs/student", description="run folder URL (local or s3://): checkpoints, metrics, previews")
    objective: ObjectiveName = Field("d2g", description="training objective")
    # SerializeAsAny: dump the objective's own fields, not only the base class's.
    objective_config: SerializeAsAny[ObjectiveConfig] = Field(
        default_factory=dict, validate_default=True,
        description="objective options (see distill.objective_config: D2GConfig, ADDConfig, RegressionConfig), "
        "e.g. {lambda_gan: 0.1}")
    max_steps: int = Field(1000, gt=0, description="optimiser steps to train for")
    batch_size: int = Field(16, gt=0, description="pairs per optimiser step per worker (before accumulation)")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimiser step; workers x batch_size "
                            "x grad_accum at the run's first start is its global batch, kept on resume (on fewer "
                            "workers, each accumulates more micro-batches)")
    lr_g: float = Field(1e-5, gt=0, description="generator learning rate (AdamW)")
    lr_d: float = Field(1e-5, gt=0, description="discriminator learning rate (AdamW)")
    betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas for both optimisers (GAN-style beta1=0)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    clip_grad: float = Field(1.0, ge=0, description="gradient-norm clip for G and D (0: off)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the generator (0: no EMA)")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision: bf16 autocast, or fp16 with loss scaling")
    compile: bool = Field(False, description="torch.compile the generator")
    grad_checkpointing: GradCheckpointing = Field(
        "none", description="recompute the activations of these trainable UNets in backward instead of keeping "
        "them (less memory, about one more forward per step; results equal to without)")
    generator_lora_rank: int = Field(0, ge=0, description="train the student as a LoRA adapter of this rank on the "
                                     "frozen teacher UNet (0: a full trainable copy); all objectives")
    generator_lora_alpha: float | None = Field(None, gt=0, description="the student adapter's LoRA alpha (scaling "
                                               "alpha / rank; default: the rank)")
    generator_lora_targets: str = Field(",".join(DEFAULT_LORA_TARGETS), description="comma-separated names of the "
                                        "UNet modules the student adapter wraps (peft target_modules)")
    discriminator_lora_rank: int = Field(0, ge=0, description="d2g only: the discriminator's UNet as a LoRA adapter "
                                         "of this rank (0: a full trainable copy); with --generator-lora-rank the "
                                         "teacher, student and discriminator share one frozen UNet")
    discriminator_lora_alpha: float | None = Field(None, gt=0, description="the discriminator adapter's LoRA alpha "
                                                   "(default: the rank)")
    discriminator_lora_targets: str = Field(",".join(DEFAULT_LORA_TARGETS), description="comma-separated names of "
                                            "the UNet modules the discriminator adapter wraps")
    fsdp: bool = Field(False, description="shard the generator and discriminator parameters, gradients and optimizer "
                       "states over the workers (FSDP; full fine-tunes of large teachers; not with LoRA; needs "
                       "--workers > 1; checkpoints stay unsharded, so a run resumes with or without it)")
    seed: int = Field(0, ge=0, description="seed of the data order and of the objective's randomness")
    workers: int = Field(1, gt=0, description="Ray Train workers (DDP ranks); 1 with --no-ray runs in-process")
    min_workers: int | None = Field(None, gt=0, description="elastic training: Ray Train may (re)start the run on as few "
                                    "as this many workers when no more fit, and grows back to --workers when capacity "
                                    "returns; the global batch stays workers x batch_size x grad_accum (default: "
                                    "--workers, no elasticity)")
    elastic_resize_seconds: float = Field(60.0, ge=0, description="with --min-workers: how often Ray Train checks "
                                          "whether more workers fit (it then restarts the run on them)")
    use_ray: bool = Field(True, description="run through Ray Train (TorchTrainer); --no-ray runs in this process")
    use_gpu: bool | None = Field(None, description="give each worker a GPU (default: when the cluster has GPUs)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker")
    max_failures: int = Field(3, ge=0, description="Ray Train restarts of the worker group after a worker or node "
                              "dies; each restart resumes from the latest complete checkpoint in --out")
    threads: int = Field(0, ge=0, description="torch CPU threads per worker (0: torch's default)")
    data_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (more than 1: resume stays "
                              "exact on the same number of ranks, but a resume on another number regroups the rest "
                              "of that epoch's samples into other global batches)")
    shuffle_block: int = Field(1024, gt=0, description="samples shuffled together in the pair stream")
    on_corrupt: Literal["raise", "skip"] = Field("raise", description="corrupt shard: stop naming it, or skip it and count it")
    checkpoint_every: int = Field(200, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, gt=0, description="checkpoints kept (older ones are deleted)")
    log_every: int = Field(10, gt=0, description="steps between metric lines")
    preview_every: int = Field(0, ge=0, description="steps between preview grids (decodes latents; 0: off)")
    resume: bool = Field(True, description="continue from the latest complete checkpoint in --out")
    device: str = Field("auto", description="torch device: auto, cuda, cpu")

    @field_validator("objective_config", mode="wrap")
    @classmethod
    def _typed_objective_config(cls, value, handler, info: ValidationInfo):
        if "objective" not in info.data:
            return value  # `objective` itself is invalid and already reported
        # A ValidationError raised here is reported under objective_config.<field>.
        return parse_objective_config(info.data["objective"], value)

    @model_validator(mode="after")
    def _min_workers_at_most_workers(self) -> TrainConfig:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers {self.min_workers} is more than workers {self.workers}")
        # Every worker count Ray Train may pick must split the global batch into whole micro-batches.
        micro = self.workers * self.grad_accum
        bad = [w for w in range(self.min_workers or self.workers, self.workers + 1) if micro % w]
        if bad:
            raise ValueError(f"min_workers {self.min_workers}: Ray Train may run on {bad[0]} workers, which cannot share "
                             f"the global batch of workers {self.workers} x grad_accum {self.grad_accum} = {micro} "
                             "micro-batches evenly; raise min_workers or grad_accum")
        return self

    @field_validator("generator_lora_targets", "discriminator_lora_targets")
    @classmethod
    def _target_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        if not all(names):
            raise ValueError(f"give comma-separated module names such as {','.join(DEFAULT_LORA_TARGETS)}, got {value!r}")
        return ",".join(names)

    @model_validator(mode="after")
    def _lora_discriminator_objective(self) -> TrainConfig:
        if self.discriminator_lora_rank and self.objective not in LORA_DISCRIMINATOR_OBJECTIVES:
            raise ValueError(f"discriminator_lora_rank: objective {self.objective!r} has no trainable discriminator "
                             f"UNet to adapt (LoRA discriminators: {', '.join(LORA_DISCRIMINATOR_OBJECTIVES)}); "
                             "use 0, or --generator-lora-rank alone")
        return self

    @model_validator(mode="after")
    def _fsdp_needs_full_copies_and_ranks(self) -> TrainConfig:
        # One line each: what --fsdp cannot be combined with, and why.
        if not self.fsdp:
            return self
        if self.generator_lora_rank or self.discriminator_lora_rank:
            raise ValueError("fsdp: not with LoRA (--generator-lora-rank / --discriminator-lora-rank): adapters are "
                             "small and share the frozen base; FSDP is for full fine-tunes")
        if self.workers == 1:
            raise ValueError("fsdp: needs --workers > 1 (there is nothing to shard over on one worker)")
        if self.amp == "fp16":
            raise ValueError("fsdp: not with amp fp16 (its loss scaler is not shard-aware here); use --amp bf16")
        if self.preview_every:
            raise ValueError("fsdp: not with --preview-every (rank 0 alone cannot run a sharded generator); "
                             "preview a checkpoint with `distill generate`")
        return self

    def memory(self) -> MemoryOptions:
        """The LoRA and gradient-checkpointing options, for distill.objectives.make_objective."""

        def lora(rank: int, alpha: float | None, targets: str) -> LoRASettings | None:
            return LoRASettings(rank, float(alpha or rank), tuple(targets.split(","))) if rank else None

        return MemoryOptions(
            generator_lora=lora(self.generator_lora_rank, self.generator_lora_alpha, self.generator_lora_targets),
            discriminator_lora=lora(self.discriminator_lora_rank, self.discriminator_lora_alpha,
                                    self.discriminator_lora_targets),
            checkpoint_generator=self.grad_checkpointing in ("generator", "both"),
            checkpoint_discriminator=self.grad_checkpointing in ("discriminator", "both"))

    @model_validator(mode="after")
    def _objective_config_matches(self) -> TrainConfig:
        expected = OBJECTIVE_CONFIGS[self.objective]
        if not isinstance(self.objective_config, expected):
            raise ValueError(f"objective_config holds {type(self.objective_config).__name__} options but objective "
                             f"{self.objective!r} takes {expected.__name__}; set objective_config with objective")
        return self

    @model_validator(mode="after")
    def _latent_lpips_weights(self) -> TrainConfig:
        """A LatentLPIPS loss needs the weights of the teacher's latent space: the built-in shapes
        teachers get the packaged ones; anyone else must name a file, which must exist, so a typo
        fails here, in one line, not in a Ray worker minutes later."""
        options = self.objective_config
        if options.regression_weight == 0 or options.regression_loss not in (*LATENT_LPIPS_LOSSES, "pixel_lpips"):
            return self
        kwargs = options.regression_kwargs
        if kwargs.get("allow_random"):
            return self
        if options.regression_loss == "pixel_lpips":
            return self._pixel_lpips_weights(kwargs)
        weights = kwargs.get("weights")
        if weights is None:
            if self.teacher not in PACKAGED_LPIPS_FOR_TEACHER:
                raise ValueError(
                    f"objective_config.regression_kwargs.weights: {options.regression_loss} needs the LatentLPIPS "
                    f"of teacher {self.teacher!r}'s latent space: an official *_latest_vgg16_tuned.pth (sd15, sd21, "
                    "sdxl, sd3, flux) or one trained with `distill lpips`; e.g. --objective-config "
                    "'{regression_kwargs: {weights: /path/sd15_latest_vgg16_tuned.pth}}'")
            options.regression_kwargs = {**kwargs, "weights": PACKAGED_LPIPS_FOR_TEACHER[self.teacher]}
        return self

    def _pixel_lpips_weights(self, kwargs: dict) -> TrainConfig:
        # The shapes world's pixel LPIPS ships; ImageNet VGG16 + LPIPS heads cannot.
        if "weights" in kwargs or ("vgg_weights" in kwargs and "lpips_weights" in kwargs):
            return self
        if self.teacher not in PACKAGED_PIXEL_LPIPS_FOR_TEACHER:
            raise ValueError(
                "objective_config.regression_kwargs: pixel_lpips needs vgg_weights and lpips_weights (a torchvision "
                "vgg16 state dict and LPIPS's vgg.pth, local files) or weights (a pixel-trunk LPIPS made with "
                "`distill lpips train-trunk --pools-removed 0` and `calibrate`)")
        self.objective_config.regression_kwargs = {**kwargs, "weights": PACKAGED_PIXEL_LPIPS_FOR_TEACHER[self.teacher]}
        return self

    def check_inputs(self) -> None:
        """What a driver checks before starting Ray or writing to --out: a local --out can be
        created and written, the pair store has a committed version and the LatentLPIPS weights
        file exists (validation alone cannot: a job config is checked on a machine that may not see
        the cluster's files). TrainConfigError or StoreError naming the path."""
        from store import PairStore, parse_url

        # First: it is the cheapest check, and without it a bad --out fails inside Ray Train (a
        # traceback from its controller) or after the teacher is loaded.
        check_local_out_folder(self.out)
        root, version = parse_url(self.data)
        store = PairStore(root)
        if store.latest_version() is None:
            raise TrainConfigError(f"--data {self.data}: no committed version of a pair store there "
                                   "(make one with `pairgen run`)")
        if version is not None and version not in store.versions():
            raise TrainConfigError(f"--data {self.data}: no version v{version} (versions: {store.versions()})")
        for key in ("weights", "vgg_weights", "lpips_weights"):
            weights = self.objective_config.regression_kwargs.get(key)
            if (weights is not None and str(weights) not in PACKAGED_LPIPS and "://" not in str(weights)
                    and not os.path.isfile(str(weights))):
                raise TrainConfigError(f"objective_config.regression_kwargs.{key}: LPIPS weights file {weights} "
                                       "does not exist")


def load_train_config(yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < YAML file < flags, validated (the objective's own options included); raises
    TrainConfigError naming the source and every bad field, e.g. `objective_config.lambda_gan`."""
    return build_model(TrainConfig, yaml_path, overrides, TrainConfigError)
