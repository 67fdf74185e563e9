"""The generation fingerprint: every setting that changes what a pair contains.

A store root holds one fingerprint; pairgen refuses to add shards made with different settings.
Settings that only change speed (workers, batch size, device) are not part of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from d2g.teacher.noise import NOISE_RULE
from d2g.teacher.schedulers import SOLVER_KWARGS
from pairgen.config import GenerationConfig
from pairgen.prompts import PromptSource

FINGERPRINT_VERSION = 1


def _local_teacher_identity(folder: Path) -> str:
    # Independent of where the folder sits (clusters mount it at different paths), sensitive to
    # which model it is: the pipeline layout and the denoiser and scheduler configs.
    digest = xxhash.xxh3_64()
    for part in ("model_index.json", "unet/config.json", "transformer/config.json", "scheduler/scheduler_config.json"):
        file = folder / part
        if file.exists():
            digest.update(part.encode())
            digest.update(file.read_bytes())
    return f"{folder.name}#config-{digest.hexdigest()}"


def teacher_identity(teacher: str) -> str:
    """Built-in aliases are versioned with the package (their weights ship inside it); local
    folders are named by content; hub ids by themselves (with the revision beside them)."""
    from d2g.teacher.loading import ALIASES

    if os.path.isdir(teacher) and teacher not in ALIASES:
        return _local_teacher_identity(Path(teacher).resolve())

    if teacher in ALIASES:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{teacher}@d2g-{version('d2g')}"
        except PackageNotFoundError:
            return f"{teacher}@d2g-dev"
    return teacher


def build_fingerprint(config: GenerationConfig, prompts: PromptSource) -> dict:
    """The fingerprint of a run of `config` over `prompts`: teacher identity, pinned solver settings,
    resolution, noise rule, prompt source digest and shard layout (JSON-ready)."""
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "teacher": {"name": teacher_identity(config.teacher), "revision": config.revision, "dtype": config.dtype},
        "solver": {
            "scheduler": config.scheduler,
            "pinned_kwargs": SOLVER_KWARGS[config.scheduler],
            "timestep_spacing": config.timestep_spacing,
            "steps": config.steps,
            "guidance": config.guidance,
            "guidance_rescale": config.guidance_rescale,
            "negative_prompt": config.negative_prompt,
        },
        "resolution": {"height": config.height, "width": config.width},
        "noise": {"seed": config.seed, "rule": NOISE_RULE},
        "prompts": prompts.describe(),
        "layout": {"shard_size": config.shard_size, "store_prompt_embeds": config.store_prompt_embeds,
                   "trajectory_points": config.trajectory_points},
    }
