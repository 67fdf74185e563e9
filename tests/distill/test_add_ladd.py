"""ADD and LADD as published, under those names: their students' step sampling, the score-distillation
guidance read from the pair store, the NFSD target against its definition in epsilon space, and
few-step students for `add`, `ladd` and `regression` (d2g keeps refusing them)."""

from __future__ import annotations

import logging

import pytest
import torch

from distill.conditioning import TextConditioner
from distill.objective_config import ADDConfig, LADDConfig, RegressionConfig, parse_objective_config
from distill.objectives import make_objective, pairs_guidance
from tests.helpers.objectives import PROMPTS


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _batch(n=4):
    return {"noise": torch.randn(n, 4, 8, 8), "latent": torch.randn(n, 4, 8, 8), "prompt": PROMPTS[:n]}


def _store_with_guidance(root, guidance) -> str:
    from store import PairStore

    PairStore(str(root)).ensure_fingerprint({"solver": {"scheduler": "ddim", "guidance": guidance}})
    return str(root)


@pytest.mark.parametrize("name,first_share", [("add", 0.25), ("ladd", 0.7)])
def test_training_steps_start_at_the_grid_as_published(name, first_share, sd15_teacher):
    """ADD: its 4 timesteps uniformly; LADD: 0.7, 0.1, 0.1, 0.1; both on the sampler's grid, the
    first from the pair's noise, the others from the pair's latent re-noised."""
    obj = make_objective(name, _load(sd15_teacher))
    torch.manual_seed(0)
    n = 4000
    noise, latent = torch.randn(n, 1, 1, 1), torch.full((n, 1, 1, 1), 5.0)
    x_in, t = obj._student_input(noise, latent)
    assert set(t.tolist()) == {999, 749, 499, 249} and obj.grid == [999, 749, 499, 249]
    first = t == 999
    assert float(first.float().mean()) == pytest.approx(first_share, abs=0.03)
    assert torch.equal(x_in[first], noise[first])
    alpha = obj.schedule.coefficients(t[~first], x_in[~first])[0]
    # A re-noised latent of 5: its mean is alpha * 5 (the pair's latent leaks into later steps only).
    assert float((x_in[~first] - alpha * 5).mean()) == pytest.approx(0.0, abs=0.1)


def test_ladd_trains_with_the_adversarial_loss_alone(sd15_teacher):
    obj = make_objective("ladd", _load(sd15_teacher))
    assert type(obj.discriminator).__name__ == "ADDDiscriminator"
    loss, logs = obj.generator_loss(_batch(), 0)
    assert set(logs) == {"g/gan", "g/total"}
    loss.backward()
    d_loss, d_logs = obj.discriminator_loss(_batch(), 0)
    assert torch.isfinite(d_loss) and "d/r1" in d_logs


def test_score_distillation_guidance_defaults_to_the_pairs(sd15_teacher, tmp_path, caplog):
    pipe = _load(sd15_teacher)
    data = _store_with_guidance(tmp_path / "pairs", 3.0)
    assert pairs_guidance(data) == 3.0 and pairs_guidance(f"{data}@v2") == 3.0
    assert make_objective("add", pipe, data=data).config.sd_guidance_scale == 3.0
    assert make_objective("add", pipe, ADDConfig(sd_guidance_scale=1.5), data=data).config.sd_guidance_scale == 1.5
    # Guidance <= 1 in pairgen means none; a store without a fingerprint says nothing.
    assert make_objective("add", pipe, data=_store_with_guidance(tmp_path / "p0", 0.0)).sd_guidance_scale == 1.0
    assert pairs_guidance(str(tmp_path / "empty")) is None
    with caplog.at_level(logging.WARNING, logger="distill"):
        unresolved = make_objective("add", pipe)
    assert unresolved.config.sd_guidance_scale is None and unresolved.sd_guidance_scale == 1.0
    assert "sd_guidance_scale is unset" in caplog.text
    # The typed config the run saves keeps None (resolved again, the same way, on resume).
    config = ADDConfig()
    make_objective("add", pipe, config, data=data)
    assert config.sd_guidance_scale is None
    # Nothing to resolve without a score-distillation term.
    assert make_objective("ladd", pipe, data=data).config.sd_guidance_scale is None


def test_guided_score_distillation_target_is_cfg_of_the_teacher(sd15_teacher):
    pipe = _load(sd15_teacher)
    obj = make_objective("add", pipe, ADDConfig(sd_guidance_scale=3.0))
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = TextConditioner(pipe)({"noise": x_t, "prompt": PROMPTS[:2]}, (8, 8))
    uncond = obj.conditioner.negative(2, (8, 8))
    with torch.no_grad():
        x0_u = obj.schedule.to_x0(pipe.unet(x_t, t, **uncond.unet_kwargs()).sample, x_t, t)
        x0_c = obj.schedule.to_x0(pipe.unet(x_t, t, **cond.unet_kwargs()).sample, x_t, t)
        target = obj._teacher_x0(x_t, t, cond)
    torch.testing.assert_close(target, x0_u + 3.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_nfsd_target_follows_its_definition_in_epsilon_space(teacher, request):
    """NFSD (Katzir et al. 2024): the student's update direction is delta_D + s delta_C in place of
    SDS's eps_cfg - eps; delta_C = eps(y) - eps(""), delta_D = eps("") below t = 200 and
    eps("") - eps(negative prompt) above. In x0 space: x0 - target = (sigma/alpha)(delta_D + s delta_C)."""
    pipe = _load(request.getfixturevalue(teacher))
    s = 2.5
    obj = make_objective("add", pipe, ADDConfig(sd_weighting="nfsd", sd_guidance_scale=s))
    b = 4
    x0 = torch.randn(b, 4, 8, 8)
    t = torch.tensor([50, 199, 200, 800])
    eps = torch.randn(b, 4, 8, 8)
    x_t = obj.schedule.add_noise(x0, eps, t)
    conditioner = TextConditioner(pipe)
    cond = conditioner({"noise": x0, "prompt": PROMPTS[:b]}, (8, 8))
    negative = conditioner({"noise": x0, "prompt": [obj.config.nfsd_negative_prompt] * b}, (8, 8))
    with torch.no_grad():
        def eps_of(c):
            return pipe.unet(x_t, t, **c.unet_kwargs()).sample  # an epsilon-prediction teacher

        e_u, e_c, e_n = eps_of(conditioner.negative(b, (8, 8))), eps_of(cond), eps_of(negative)
        target = obj._nfsd_target(x0, x_t, t, cond)
    low = (t < 200).view(-1, 1, 1, 1)
    direction = torch.where(low, e_u, e_u - e_n) + s * (e_c - e_u)
    alpha, sigma = obj.schedule.coefficients(t, x0)
    torch.testing.assert_close(x0 - target, sigma / alpha * direction, rtol=1e-3, atol=1e-3)
    # In the objective: finite, and its gradient reaches the student.
    loss, logs = obj.generator_loss(_batch(), 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["g/score_distillation"] > 0
    assert all(p.grad is not None for p in obj.generator.parameters())


@pytest.mark.parametrize("name,options", [
    ("add", {"student_steps": 2, "sd_guidance_scale": 2.0}),
    ("ladd", {"student_steps": 3}),
    ("regression", {"student_steps": 4}),
])
def test_few_step_students_train_and_sample(name, options, sd15_teacher):
    obj = make_objective(name, _load(sd15_teacher), parse_objective_config(name, options))
    steps = options["student_steps"]
    assert len(obj.grid) == steps
    opt = torch.optim.SGD(obj.generator.parameters(), lr=1e-4)
    for step in range(2):
        if obj.discriminator is not None:
            obj.discriminator_loss(_batch(), step)[0].backward()
        loss, logs = obj.generator_loss(_batch(), step)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    batch = _batch(2)
    a = obj.sample(batch, generator=torch.Generator().manual_seed(1))
    b = obj.sample(batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert obj.sample(batch, steps=1).shape == a.shape
    with pytest.raises(ValueError, match=f"trained for {steps} steps"):
        obj.sample(batch, steps=steps + 1)


def test_regression_presets_stay_one_step():
    assert RegressionConfig().student_steps == 1 and LADDConfig().student_steps == 4
