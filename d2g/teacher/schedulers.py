"""Deterministic ODE solvers as diffusers schedulers, with every kwarg pinned and recorded.

Only the noise-schedule kwargs (betas, training steps, prediction type) come from the teacher;
everything that changes the solver is set here explicitly, because `from_config` silently
carries kwargs like clip_sample or timestep_spacing from one scheduler class to another.
"""

from __future__ import annotations

from typing import Any

# Inherited from the teacher: they define the trained noise schedule, not the solver.
TEACHER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "rescale_betas_zero_snr")

SOLVER_KWARGS: dict[str, dict[str, Any]] = {
    "ddim": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, thresholding=False),
    "dpmpp": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                  euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False, final_sigmas_type="zero",
                  thresholding=False, steps_offset=1),
    "euler": dict(interpolation_type="linear", use_karras_sigmas=False, timestep_type="discrete",
                  final_sigmas_type="zero", steps_offset=1),
}
# The pipeline's `eta` argument: DDIM with eta=0 is the deterministic ODE solver.
CALL_KWARGS: dict[str, dict[str, Any]] = {"ddim": {"eta": 0.0}, "dpmpp": {}, "euler": {}}


class SchedulerError(ValueError):
    """An unknown solver name, or a teacher whose schedule these solvers cannot run (flow matching)."""


def _scheduler_class(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of {sorted(classes)}")
    return classes[name]


def solver_kwargs(name: str, teacher_config: dict, timestep_spacing: str) -> dict[str, Any]:
    """The complete kwargs the solver is built with: teacher schedule + pinned solver settings."""
    _scheduler_class(name)
    if "FlowMatch" in str(teacher_config.get("_class_name", "")):
        raise SchedulerError(
            "flow-matching teachers (SD3/FLUX-style) are not supported by pairgen's solvers yet; "
            f"the teacher's scheduler is {teacher_config.get('_class_name')}"
        )
    kwargs = {k: teacher_config[k] for k in TEACHER_KEYS if k in teacher_config}
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
    kwargs.update(SOLVER_KWARGS[name])
    kwargs["timestep_spacing"] = timestep_spacing
    return kwargs


def build_scheduler(name: str, teacher_config: dict, timestep_spacing: str = "trailing"):
    """A fresh scheduler instance built from explicit kwargs only (never from_config)."""
    return _scheduler_class(name)(**solver_kwargs(name, dict(teacher_config), timestep_spacing))
