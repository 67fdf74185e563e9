"""The options of `distill eval --prompts`: zero-shot image evaluation (FID, CLIP score) of a student
or a teacher, from YAML and/or flags, validated up front."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2g.cli.options import build_model

METRICS = ("fid", "clip")


class EvalConfigError(ValueError):
    """A bad option; the message names the field (and the config file, when there is one)."""


class EvalConfig(BaseModel):
    """Every option of `distill eval --prompts ...` (jobs/eval_*.yaml hold them at paper scale)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="exported student folder (distill export); or give --teacher")
    teacher: str | None = Field(None, description="evaluate this teacher (alias, folder or hub id) at --steps "
                                "instead of a student: the side-by-side row")
    steps: int | None = Field(None, ge=1, description="sampling steps (student: default its recommended steps; "
                              "teacher: default 25, DDIM eta 0, trailing grid)")
    guidance: float = Field(3.0, description="teacher's classifier-free guidance (students ignore it)")
    prompts: str | None = Field(None, description="prompt file: .jsonl/.parquet (column --prompts-column, default "
                                "'caption' then 'prompt'; ids from 'id'), .txt, or shapes://train|heldout")
    prompts_column: str | None = Field(None, description="column of the prompt text in .jsonl/.parquet/.csv")
    num: int | None = Field(None, ge=2, description="evaluate the first NUM prompts (default: all; shapes:// 256)")
    seed: int = Field(0, description="noise seed: prompt i's noise is a pure function of (seed, i), as in pairgen")
    metrics: str = Field("fid,clip", description="comma-separated: fid, clip (on the shapes world clip is the "
                         "evaluator's attribute agreement)")
    reference: str | None = Field(None, description="FID reference: an image folder, or precomputed statistics "
                                  "(.npz with mu, sigma); shapes://train for real shapes renderings (the default "
                                  "for shapes models)")
    feature_net: str = Field("auto", description="FID features: 'inception:PATH' (local TorchScript "
                             "inception-2015-12-05.pt), 'shapes' (the packaged shapes evaluator), or 'auto' "
                             "(shapes for shapes models)")
    protocol: str | None = Field(None, description="resize/crop protocol: clean, dmd2 or native (default: native "
                                 "for the shapes evaluator, clean otherwise)")
    clip_model: str | None = Field(None, description="local CLIP folder for CLIP score (e.g. a saved "
                                   "laion/CLIP-ViT-g-14-laion2B-s12B-b42K); nothing is downloaded")
    out: str = Field("eval-results", description="results folder (local or s3://): images, finished shards, "
                     "JSON per model and results.md")
    name: str | None = Field(None, description="row name (default from the model or teacher and steps)")
    shard_size: int = Field(250, ge=1, description="prompts per shard: the unit of work and of resuming")
    batch_size: int = Field(16, ge=1, description="images per sampler call and per metric batch")
    workers: int = Field(0, ge=0, description="Ray tasks in flight (0: generate in this process, no Ray)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray task (fractions allowed)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Ray task (fractions allowed)")
    device: str = Field("auto", description="torch device for sampling and metrics (auto: cuda if present)")

    @field_validator("model", "teacher", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        # `--model ""` on the command line unsets a config file's model (to evaluate its teacher instead).
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_subject(self) -> EvalConfig:
        if (self.model is None) == (self.teacher is None):
            raise ValueError("give exactly one of model (an exported student) or teacher")
        if not self.prompts:
            raise ValueError("prompts is required (a prompt file or shapes://train)")
        unknown = [m for m in self.metric_list() if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        return self

    def metric_list(self) -> list[str]:
        """The metrics asked for, in order."""
        return [m.strip() for m in self.metrics.split(",") if m.strip()]


def load_eval_config(path: str | None, overrides: dict | None = None) -> EvalConfig:
    """Defaults < YAML at `path` < `overrides`; EvalConfigError naming the field and the file."""
    return build_model(EvalConfig, path, overrides, EvalConfigError)
