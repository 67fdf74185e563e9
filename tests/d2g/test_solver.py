"""pairgen's solver is the teacher's own: same latent as the pipeline, pinned schedulers, pure noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2g.teacher.loading import TeacherError, load_teacher
from d2g.teacher.noise import batch_noise, sample_noise
from d2g.teacher.schedulers import SOLVER_KWARGS, SchedulerError, build_scheduler, solver_kwargs
from d2g.teacher.solver import SolverSettings, TeacherSolver, trajectory_steps


def test_noise_is_a_pure_function_of_seed_and_index():
    shape = (4, 8, 8)
    batch = batch_noise(7, [3, 4, 5], shape)
    assert torch.equal(batch[1], sample_noise(7, 4, shape))
    assert not torch.equal(sample_noise(7, 4, shape), sample_noise(8, 4, shape))
    assert not torch.equal(sample_noise(7, 4, shape), sample_noise(7, 5, shape))
    assert batch.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(SOLVER_KWARGS))
def test_scheduler_kwargs_are_pinned_not_inherited(name):
    # A teacher config with solver settings that must NOT leak into our solver.
    teacher = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
               "clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "leading",
               "use_karras_sigmas": True}
    scheduler = build_scheduler(name, teacher, "trailing")
    cfg = scheduler.config
    assert cfg.timestep_spacing == "trailing"
    assert cfg.beta_schedule == "scaled_linear" and cfg.beta_end == 0.012
    for key, value in SOLVER_KWARGS[name].items():
        assert cfg[key] == value, key
    assert solver_kwargs(name, teacher, "trailing")["timestep_spacing"] == "trailing"


def test_unknown_scheduler_and_flow_matching_are_refused():
    with pytest.raises(SchedulerError, match="unknown scheduler 'heun'"):
        build_scheduler("heun", {}, "trailing")
    with pytest.raises(SchedulerError, match="flow-matching"):
        solver_kwargs("ddim", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "trailing")


def test_trajectory_steps_are_inside_the_solve():
    assert trajectory_steps(10, 0) == []
    assert trajectory_steps(10, 1) == [4]
    assert trajectory_steps(50, 4) == [9, 19, 29, 39]
    with pytest.raises(ValueError):
        trajectory_steps(4, 4)


def test_bad_teacher_paths_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no model_index.json"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(TeacherError, match="is a file"):
        load_teacher(str(tmp_path / "file.bin"))


def _reference_latent(teacher_path, settings: SolverSettings, prompt: str, noise: torch.Tensor):
    """The stock pipeline, called the ordinary way, with the same (pinned) scheduler."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(settings.scheduler, dict(pipe.scheduler.config), settings.timestep_spacing)
    extra = {"eta": 0.0} if settings.scheduler == "ddim" else {}
    return pipe(prompt=[prompt], latents=noise, num_inference_steps=settings.steps,
                guidance_scale=settings.guidance, output_type="latent", **extra).images


@pytest.mark.parametrize("teacher_fixture", ["sd15_teacher", "sdxl_teacher"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_stored_latent_equals_the_pipelines_own_result(request, teacher_fixture, scheduler):
    path = request.getfixturevalue(teacher_fixture)
    settings = SolverSettings(scheduler=scheduler, steps=4, guidance=3.0)
    solver = TeacherSolver(load_teacher(str(path)), settings)
    prompts = ["a red circle", "a blue square"]
    noise = batch_noise(0, [0, 1], solver.latent_shape)
    out = solver.solve(prompts, noise)
    for row, prompt in enumerate(prompts):
        ref = _reference_latent(path, settings, prompt, noise[row: row + 1])
        # Batched text encoding may differ from batch-of-one in the last bits; nothing more.
        torch.testing.assert_close(out["latent"][row: row + 1], ref, rtol=1e-4, atol=1e-4)
    single = solver.solve(prompts[:1], noise[:1])
    ref = _reference_latent(path, settings, prompts[0], noise[:1])
    assert torch.equal(single["latent"], ref), "batch of one must be bit-identical to the pipeline"
    assert torch.equal(out["noise"], noise)


def test_solver_schema_and_optional_fields(sdxl_teacher):
    settings = SolverSettings(steps=4, guidance=2.0, store_prompt_embeds=True, trajectory_points=2)
    solver = TeacherSolver(load_teacher(str(sdxl_teacher)), settings)
    out = solver.solve(["a cat"], batch_noise(1, [0], solver.latent_shape))
    schema = solver.schema()
    assert set(schema) == {"noise", "latent", "prompt_embeds", "pooled_prompt_embeds", "trajectory"}
    for name, (dtype, shape) in schema.items():
        assert tuple(out[name].shape[1:]) == shape, name
        assert np.dtype(dtype) == np.float32
    assert len(solver.trajectory_timesteps()) == 2
    # Trajectory points are intermediate states: neither the start nor the end.
    assert not torch.equal(out["trajectory"][:, -1], out["latent"])


def test_truncated_prompts_are_counted(sd15_teacher):
    solver = TeacherSolver(load_teacher(str(sd15_teacher)), SolverSettings(steps=2))
    long_prompt = " ".join(["red"] * 200)
    assert solver.count_truncated(["a red circle", long_prompt]) == 1
