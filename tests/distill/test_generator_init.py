"""The student starts as the teacher: its one-step output equals the teacher's one-step DDIM x0."""

from __future__ import annotations

import pytest
import torch

from distill.conditioning import TextConditioner
from distill.generator import NoiseSchedule, OneStepGenerator
from tests.helpers.objectives import PROMPTS, ddim_trailing, teacher_latents


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


@pytest.fixture(scope="module")
def sd15_v_teacher(tmp_path_factory):
    from d2g.testing import build_sd15

    return build_sd15(tmp_path_factory.mktemp("teachers") / "sd15_v", prediction_type="v_prediction")


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher", "sd15_v_teacher"])
def test_one_step_output_equals_teacher_ddim_trailing(teacher, request):
    pipe = _load(request.getfixturevalue(teacher))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:3]
    expected = teacher_latents(pipe, noise, prompts, steps=1)

    gen = OneStepGenerator(pipe.unet, pipe.scheduler)
    cond = TextConditioner(pipe)({"noise": noise, "prompt": prompts}, (8, 8))
    with torch.no_grad():
        out = gen(noise, None, cond)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # A student evaluated at t=1 (DDIM's default "leading" spacing for one step) would differ.
    with torch.no_grad():
        wrong = gen(noise, torch.ones(3, dtype=torch.long), cond)
    assert not torch.allclose(wrong, expected, atol=1e-2)


def test_trailing_grid_matches_diffusers(sd15_teacher):
    pipe = _load(sd15_teacher)
    schedule = NoiseSchedule(pipe.scheduler)
    for steps in (1, 2, 3, 4):
        ddim = ddim_trailing(pipe, steps)
        ddim.set_timesteps(steps)
        assert schedule.trailing_grid(steps) == ddim.timesteps.tolist()
    with pytest.raises(ValueError, match="student steps"):
        schedule.trailing_grid(0)


def test_few_step_sampling_is_deterministic_given_a_generator(sdxl_teacher):
    pipe = _load(sdxl_teacher)
    gen = OneStepGenerator(pipe.unet, pipe.scheduler)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = TextConditioner(pipe)({"noise": noise, "prompt": PROMPTS[:2]}, (8, 8))
    a = gen.sample(noise, cond, steps=4, generator=torch.Generator().manual_seed(5))
    b = gen.sample(noise, cond, steps=4, generator=torch.Generator().manual_seed(5))
    c = gen.sample(noise, cond, steps=4, generator=torch.Generator().manual_seed(6))
    one = gen.sample(noise, cond, steps=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, one)


def test_generator_is_a_trainable_float32_copy(sd15_teacher):
    pipe = _load(sd15_teacher)
    gen = OneStepGenerator(pipe.unet, pipe.scheduler, gradient_checkpointing=True)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in gen.parameters())
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert gen.unet is not pipe.unet and gen.unet.is_gradient_checkpointing
    with torch.no_grad():
        next(gen.unet.parameters()).add_(1.0)
    assert not torch.equal(next(gen.unet.parameters()), next(pipe.unet.parameters()))


def test_unknown_prediction_type_is_rejected(sd15_teacher):
    from diffusers import DDIMScheduler

    pipe = _load(sd15_teacher)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        NoiseSchedule(sched)
