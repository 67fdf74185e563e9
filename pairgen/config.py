"""The generation config: every option of `pairgen run`, from YAML and/or flags, validated up front."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from d2g.cli.options import build_model

# UNet (epsilon/v) solvers, then the flow-matching ones for SD3/FLUX-style teachers; auto picks
# ddim or flow_euler by the teacher's family.
SCHEDULERS = ("auto", "ddim", "dpmpp", "euler", "flow_euler", "flow_heun")


class ConfigError(ValueError):
    """A bad option; the message names the field (and the config file, when there is one)."""


class GenerationConfig(BaseModel):
    """What to generate and where. Fields marked (fingerprint) define the dataset: a store root
    holds one fingerprint, and a run whose fingerprint differs is refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    teacher: str = Field("shapes", description="diffusers pipeline: hub id, local folder, or built-in alias (fingerprint)")
    revision: str | None = Field(None, description="hub revision of the teacher (fingerprint)")
    drop_t5: bool = Field(False, description="SD3 teachers: load without the T5 encoder (text_encoder_3=None, as "
                          "StableDiffusion3Pipeline allows; saves its memory); its tokens become zeros, which changes "
                          "the pairs (fingerprint)")
    prompts: str = Field("shapes://train", description="prompt source URL: .txt, .jsonl, .csv, .parquet on any fsspec filesystem, or shapes://train (fingerprint: content hash)")
    prompt_column: str = Field("prompt", description="column / JSON key holding the prompt in jsonl, csv, parquet sources")
    out: str = Field("pairs", description="dataset root URL (local path, s3://...)")
    num_pairs: int = Field(1024, gt=0, description="total pairs in the dataset; a larger value than before extends it")
    shard_size: int = Field(256, gt=0, description="pairs per shard; shard i holds samples [i*S, (i+1)*S) (fingerprint)")
    steps: int = Field(50, gt=0, le=1000, description="solver steps (fingerprint)")
    scheduler: Literal["auto", "ddim", "dpmpp", "euler", "flow_euler", "flow_heun"] = Field(
        "auto", description="deterministic ODE solver: ddim, dpmpp, euler for UNet teachers (SD1.5/SDXL-style); "
        "flow_euler, flow_heun (rectified flow) for SD3/FLUX-style teachers; auto: ddim or flow_euler by the "
        "teacher (fingerprint)")
    timestep_spacing: Literal["trailing", "leading", "linspace"] = Field("trailing", description="timestep grid of UNet solvers; trailing starts at t=T-1 (fingerprint)")
    guidance: float = Field(3.0, ge=0.0, description="classifier-free guidance scale (UNet, SD3; <= 1 disables "
                            "guidance), or FLUX's embedded guidance scale (fingerprint)")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0, description="guidance rescale phi, UNet teachers (fingerprint)")
    true_cfg: float = Field(1.0, ge=0.0, description="FLUX only: true classifier-free guidance scale, a second "
                            "pass with the negative prompt; <= 1 off (fingerprint)")
    flow_shift: float | None = Field(None, gt=0, description="flow-matching teachers: the fixed sigma shift "
                                     "(SD3: 3.0); default: the teacher's scheduler config (fingerprint)")
    flow_dynamic_shifting: bool | None = Field(None, description="flow-matching teachers: shift by the image's "
                                               "token count (mu, as FLUX.1-dev) instead of flow_shift; default: "
                                               "the teacher's (fingerprint)")
    flow_base_shift: float | None = Field(None, description="dynamic shifting: mu at flow_base_seq_len tokens; "
                                          "default: the teacher's (fingerprint)")
    flow_max_shift: float | None = Field(None, description="dynamic shifting: mu at flow_max_seq_len tokens; "
                                         "default: the teacher's (fingerprint)")
    flow_base_seq_len: int | None = Field(None, gt=0, description="dynamic shifting: image tokens where mu = "
                                          "flow_base_shift; default: the teacher's (fingerprint)")
    flow_max_seq_len: int | None = Field(None, gt=0, description="dynamic shifting: image tokens where mu = "
                                         "flow_max_shift; default: the teacher's (fingerprint)")
    max_sequence_length: int | None = Field(None, gt=0, le=512, description="SD3/FLUX: T5 tokens per prompt; "
                                            "default: the pipeline's (SD3 256, FLUX 512) (fingerprint)")
    negative_prompt: str = Field("", description="negative prompt for guidance (fingerprint)")
    seed: int = Field(0, ge=0, description="dataset seed; noise of sample j is a pure function of (seed, j) (fingerprint)")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="teacher dtype (fingerprint)")
    height: int | None = Field(None, gt=0, description="image height in pixels; default: the teacher's (fingerprint)")
    width: int | None = Field(None, gt=0, description="image width in pixels; default: the teacher's (fingerprint)")
    store_prompt_embeds: bool = Field(False, description="also store prompt embeddings (and pooled ones) per pair (fingerprint)")
    trajectory_points: int = Field(0, ge=0, description="also store K intermediate ODE points per pair (fingerprint)")
    batch_size: int = Field(8, gt=0, description="pairs per teacher call")
    workers: int = Field(1, gt=0, description="teacher actors (one GPU each on a GPU cluster)")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per actor; default: a fair share of the local CPUs")
    threads_per_worker: int = Field(1, gt=0, description="torch CPU threads per actor; fixed (not derived from --workers) because CPU float results depend on the thread count, and shards must be byte-identical whatever the worker count")
    device: str = Field("auto", description="torch device inside each actor: auto, cuda, cpu, mps")
    commit_every: int = Field(0, ge=0, description="commit a version every K new shards (0: only at the end)")
    max_retries: int = Field(3, ge=0, description="attempts per shard beyond the first before the run fails")
    actor_start_timeout: float = Field(600.0, gt=0, description="seconds a teacher actor may take to start "
                                       "(find resources, load the teacher) before the run goes on without it")
    actor_restart_interval: float = Field(30.0, gt=0, description="seconds between tries to start a teacher "
                                          "actor again in place of one given up for lack of resources (a lost "
                                          "node), so a node added back is used again; a try that is still "
                                          "pending never receives shards")
    repair: bool = Field(False, description="regenerate committed shards whose files are missing or damaged "
                         "(byte-identical to the originals, or nothing is replaced) and commit a new version")

    @field_validator("out", "prompts", "teacher")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def solver_settings(config: GenerationConfig):
    """The solver options of `config`, as d2g.teacher.solver.TeacherSolver takes them."""
    from d2g.teacher.schedulers import FlowShift
    from d2g.teacher.solver import SolverSettings

    return SolverSettings(
        scheduler=config.scheduler, steps=config.steps, timestep_spacing=config.timestep_spacing,
        guidance=config.guidance, guidance_rescale=config.guidance_rescale,
        negative_prompt=config.negative_prompt, height=config.height, width=config.width,
        store_prompt_embeds=config.store_prompt_embeds, trajectory_points=config.trajectory_points,
        flow=FlowShift(shift=config.flow_shift, dynamic_shifting=config.flow_dynamic_shifting,
                       base_shift=config.flow_base_shift, max_shift=config.flow_max_shift,
                       base_seq_len=config.flow_base_seq_len, max_seq_len=config.flow_max_seq_len),
        true_cfg=config.true_cfg, max_sequence_length=config.max_sequence_length,
    )


def load_config(yaml_path: str | None = None, overrides: dict | None = None) -> GenerationConfig:
    """Defaults < YAML file < flags. Unknown keys and bad values raise ConfigError naming them."""
    return build_model(GenerationConfig, yaml_path, overrides, ConfigError)
