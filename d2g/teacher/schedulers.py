"""Deterministic ODE solvers as diffusers schedulers, with every kwarg pinned and recorded.

Two families. UNet teachers (epsilon / v prediction): DDIM, DPM-Solver++ and Euler; only the
noise-schedule kwargs (betas, training steps, prediction type) come from the teacher. Flow-matching
transformer teachers (SD3, FLUX): the rectified-flow Euler and Heun solvers; the teacher's sigma
shifting (shift, or resolution-dependent dynamic shifting with its base/max shift and sequence
lengths) is inherited unless overridden, and everything else is pinned. Every kwarg is set
explicitly, because `from_config` silently carries kwargs like clip_sample, timestep_spacing or
use_karras_sigmas from one scheduler class to another.
"""

from __future__ import annotations

from dataclasses import dataclass
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
CALL_KWARGS: dict[str, dict[str, Any]] = {"ddim": {"eta": 0.0}, "dpmpp": {}, "euler": {}, "flow_euler": {},
                                          "flow_heun": {}}

UNET_SCHEDULERS = tuple(SOLVER_KWARGS)
FLOW_SCHEDULERS = ("flow_euler", "flow_heun")
AUTO = "auto"

# Flow matching: the teacher's sigma shifting, inherited (or overridden by FlowShift), and the
# pinned rest. FlowMatchHeunDiscreteScheduler knows only num_train_timesteps and a fixed shift.
FLOW_TEACHER_KEYS = {
    "flow_euler": ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                   "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal"),
    "flow_heun": ("num_train_timesteps", "shift"),
}
FLOW_SOLVER_KWARGS: dict[str, dict[str, Any]] = {
    "flow_euler": dict(invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                       use_beta_sigmas=False, stochastic_sampling=False),
    "flow_heun": {},
}
# FlowMatchEulerDiscreteScheduler's own defaults, for teacher configs that leave a key out.
FLOW_DEFAULTS: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                                     time_shift_type="exponential", shift_terminal=None)


class SchedulerError(ValueError):
    """An unknown solver name, or a solver that does not fit the teacher (a UNet solver for a
    flow-matching teacher or the reverse, a setting the chosen solver cannot run)."""


@dataclass(frozen=True)
class FlowShift:
    """Overrides of a flow-matching teacher's sigma shifting; None keeps the teacher's value.

    Args:
        shift: the fixed shift s of sigma' = s*sigma / (1 + (s-1)*sigma) (SD3: 3.0).
        dynamic_shifting: shift by mu computed from the image's token count instead (FLUX.1-dev).
        base_shift: mu at base_seq_len tokens.
        max_shift: mu at max_seq_len tokens.
        base_seq_len: the token count where mu = base_shift.
        max_seq_len: the token count where mu = max_shift.
    """

    shift: float | None = None
    dynamic_shifting: bool | None = None
    base_shift: float | None = None
    max_shift: float | None = None
    base_seq_len: int | None = None
    max_seq_len: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The given overrides under the scheduler's own kwarg names."""
        names = {"shift": "shift", "dynamic_shifting": "use_dynamic_shifting", "base_shift": "base_shift",
                 "max_shift": "max_shift", "base_seq_len": "base_image_seq_len", "max_seq_len": "max_image_seq_len"}
        return {names[k]: v for k, v in self.__dict__.items() if v is not None}


def is_flow_config(teacher_config: dict) -> bool:
    """Whether a teacher's scheduler config is a flow-matching one (SD3/FLUX-style)."""
    return "FlowMatch" in str(teacher_config.get("_class_name", ""))


def resolve_scheduler_name(name: str, teacher_config: dict) -> str:
    """`name`, or for "auto" the default solver of the teacher's family (ddim for UNet teachers,
    flow_euler for flow-matching ones); SchedulerError if `name` does not fit the teacher."""
    flow = is_flow_config(teacher_config)
    if name == AUTO:
        return "flow_euler" if flow else "ddim"
    if name not in UNET_SCHEDULERS + FLOW_SCHEDULERS:
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of {sorted(UNET_SCHEDULERS + FLOW_SCHEDULERS)} or auto")
    if flow and name in UNET_SCHEDULERS:
        raise SchedulerError(
            f"option scheduler: {name!r} is a solver for UNet (epsilon/v) teachers, but this teacher is flow-matching "
            f"(SD3/FLUX-style, {teacher_config.get('_class_name')}); use flow_euler, flow_heun or auto")
    if not flow and name in FLOW_SCHEDULERS:
        raise SchedulerError(
            f"option scheduler: {name!r} is a solver for flow-matching (SD3/FLUX-style) teachers, but this teacher's "
            f"scheduler is {teacher_config.get('_class_name')}; use ddim, dpmpp, euler or auto")
    return name


def _scheduler_class(name: str):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )

    classes = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
               "flow_euler": FlowMatchEulerDiscreteScheduler, "flow_heun": FlowMatchHeunDiscreteScheduler}
    if name not in classes:
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of {sorted(classes)}")
    return classes[name]


def solver_kwargs(name: str, teacher_config: dict, timestep_spacing: str) -> dict[str, Any]:
    """The complete kwargs a UNet solver is built with: teacher schedule + pinned solver settings."""
    _scheduler_class(name)
    if name in FLOW_SCHEDULERS:
        raise SchedulerError(f"{name} is a flow-matching solver: use flow_solver_kwargs")
    if is_flow_config(teacher_config):
        raise SchedulerError(
            f"option scheduler: {name!r} cannot run a flow-matching teacher (SD3/FLUX-style, "
            f"{teacher_config.get('_class_name')}); use flow_euler, flow_heun or auto")
    kwargs = {k: teacher_config[k] for k in TEACHER_KEYS if k in teacher_config}
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
    kwargs.update(SOLVER_KWARGS[name])
    kwargs["timestep_spacing"] = timestep_spacing
    return kwargs


def flow_solver_kwargs(name: str, teacher_config: dict, overrides: FlowShift | None = None) -> dict[str, Any]:
    """The complete kwargs a flow-matching solver is built with: the teacher's sigma shifting (or
    `overrides`) + pinned settings. SchedulerError when the solver cannot run them (Heun has no
    dynamic shifting) or the teacher is not flow-matching."""
    if name not in FLOW_SCHEDULERS:
        raise SchedulerError(f"{name!r} is not a flow-matching solver; choose one of {list(FLOW_SCHEDULERS)}")
    if not is_flow_config(teacher_config):
        raise SchedulerError(f"option scheduler: {name!r} needs a flow-matching teacher; this teacher's scheduler is "
                             f"{teacher_config.get('_class_name')}")
    inherited = {k: teacher_config.get(k, FLOW_DEFAULTS[k]) for k in FLOW_TEACHER_KEYS["flow_euler"]}
    inherited.update((overrides or FlowShift()).as_kwargs())
    if name == "flow_heun":
        if inherited["use_dynamic_shifting"]:
            raise SchedulerError("option scheduler: flow_heun (FlowMatchHeunDiscreteScheduler) has no dynamic "
                                 "(resolution-dependent) shifting, which is on (the teacher's setting or option "
                                 "flow_dynamic_shifting); use flow_euler, or set flow_dynamic_shifting: false and "
                                 "a flow_shift")
        unsupported = {k: inherited[k] for k in ("shift_terminal",) if inherited[k]}
        if unsupported:
            raise SchedulerError(f"option scheduler: flow_heun cannot apply the teacher's {unsupported}; use flow_euler")
    kwargs = {k: inherited[k] for k in FLOW_TEACHER_KEYS[name]}
    kwargs.update(FLOW_SOLVER_KWARGS[name])
    return kwargs


def build_scheduler(name: str, teacher_config: dict, timestep_spacing: str = "trailing",
                    flow: FlowShift | None = None):
    """A fresh scheduler instance built from explicit kwargs only (never from_config). `name` may
    be "auto" (the teacher family's default); `timestep_spacing` applies to UNet solvers, `flow`
    to flow-matching ones."""
    teacher_config = dict(teacher_config)
    name = resolve_scheduler_name(name, teacher_config)
    if name in FLOW_SCHEDULERS:
        return _scheduler_class(name)(**flow_solver_kwargs(name, teacher_config, flow))
    return _scheduler_class(name)(**solver_kwargs(name, teacher_config, timestep_spacing))
