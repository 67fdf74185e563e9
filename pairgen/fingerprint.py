"""The generation fingerprint: every setting that changes what a pair contains.

A store root holds one fingerprint; pairgen refuses to add shards made with different settings.
Settings that only change speed (workers, batch size, device) are not part of it.

UNet teachers keep the fingerprint they always had. Flow-matching teachers (SD3/FLUX-style) record
the complete scheduler kwargs the solve runs with, the teacher's inherited shifting resolved (read
from its scheduler config, no weights loaded), the sigma-grid and mu rules of their pipeline, the
T5 token count, and how the stored [C, h, w] latents map to the denoiser's layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from d2g.teacher.noise import NOISE_RULE
from d2g.teacher.schedulers import SOLVER_KWARGS, SchedulerError
from pairgen.config import ConfigError, GenerationConfig, solver_settings
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


def solver_fingerprint(config: GenerationConfig) -> tuple[dict, dict]:
    """(the "solver" part of the fingerprint, extra "layout" keys) for `config`'s teacher, with the
    scheduler resolved ("auto") and the settings checked against the teacher's family.
    ConfigError names the option that does not fit; TeacherError a teacher that cannot be read."""
    from d2g.teacher.flow import (
        DEFAULT_MAX_SEQUENCE_LENGTH,
        FLUX,
        LATENT_LAYOUTS,
        MU_RULE,
        SIGMA_RULES,
        UNET,
        UnsupportedTeacher,
        kind_of_index,
    )
    from d2g.teacher.loading import TeacherError, drop_t5_kwargs, read_model_index, read_scheduler_config
    from d2g.teacher.schedulers import flow_solver_kwargs, resolve_scheduler_name
    from d2g.teacher.solver import check_settings

    index = read_model_index(config.teacher, config.revision)
    try:
        kind = kind_of_index(index)
    except UnsupportedTeacher as err:
        raise TeacherError(f"teacher {config.teacher!r}: {err}") from None
    if config.drop_t5:
        drop_t5_kwargs(config.teacher, config.revision)  # only SD3 teachers have a T5 to drop: refused before Ray starts
    # A UNet teacher's scheduler kwargs are pinned by name alone; only its class is needed here.
    scheduler_entry = index.get("scheduler") or [None, None]
    teacher_scheduler = (read_scheduler_config(config.teacher, config.revision) if kind != UNET
                         else {"_class_name": str(scheduler_entry[-1])})
    try:
        name = resolve_scheduler_name(config.scheduler, teacher_scheduler)
        settings = solver_settings(config.model_copy(update={"scheduler": name}))
        check_settings(kind, settings)
        if kind == UNET:
            return {
                "scheduler": name,
                "pinned_kwargs": SOLVER_KWARGS[name],
                "timestep_spacing": config.timestep_spacing,
                "steps": config.steps,
                "guidance": config.guidance,
                "guidance_rescale": config.guidance_rescale,
                "negative_prompt": config.negative_prompt,
            }, {}
        kwargs = flow_solver_kwargs(name, teacher_scheduler, settings.flow)
    except SchedulerError as err:
        raise ConfigError(f"teacher {config.teacher}: {err}") from None
    return {
        "scheduler": name,
        "pinned_kwargs": kwargs,
        "sigmas": SIGMA_RULES[kind],
        "mu": MU_RULE if kwargs.get("use_dynamic_shifting") else None,
        "steps": config.steps,
        "guidance": config.guidance,
        "guidance_kind": "flux-embedded" if kind == FLUX else "classifier-free",
        "true_cfg": config.true_cfg,
        "negative_prompt": config.negative_prompt,
        "max_sequence_length": config.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[kind],
    }, {"latent_layout": LATENT_LAYOUTS[kind]}


def build_fingerprint(config: GenerationConfig, prompts: PromptSource) -> dict:
    """The fingerprint of a run of `config` over `prompts`: teacher identity, pinned solver settings,
    resolution, noise rule, prompt source digest and shard layout (JSON-ready)."""
    solver, layout = solver_fingerprint(config)
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        # drop_t5 only when set, so fingerprints of runs that never had the option stay as they were.
        "teacher": {"name": teacher_identity(config.teacher), "revision": config.revision, "dtype": config.dtype,
                    **({"drop_t5": True} if config.drop_t5 else {})},
        "solver": solver,
        "resolution": {"height": config.height, "width": config.width},
        "noise": {"seed": config.seed, "rule": NOISE_RULE},
        "prompts": prompts.describe(),
        "layout": {"shard_size": config.shard_size, "store_prompt_embeds": config.store_prompt_embeds,
                   "trajectory_points": config.trajectory_points, **layout},
    }
