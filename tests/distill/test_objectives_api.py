"""Objective construction, typed configs and presets, the discriminator interface, conditioning
paths and bad input."""

from __future__ import annotations

import types

import pydantic
import pytest
import torch
from torch import nn

from distill import objectives
from distill.conditioning import ConditioningError, TextConditioner
from distill.discriminators.base import DiscriminatorLogits
from distill.discriminators.r1 import r1_penalty
from distill.objective_config import (
    OBJECTIVE_CONFIGS,
    ADDConfig,
    D2GConfig,
    LADDConfig,
    ObjectiveConfig,
    RegressionConfig,
    parse_objective_config,
)
from distill.objectives import BatchShapeError, NonFiniteLossError, ObjectiveError, make_objective
from tests.helpers.objectives import PROMPTS


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _batch(n=4, scale=1.0):
    return {"noise": torch.randn(n, 4, 8, 8), "latent": torch.randn(n, 4, 8, 8) * scale, "prompt": PROMPTS[:n]}


def test_unknown_names_list_the_valid_ones(sd15_teacher):
    pipe = _load(sd15_teacher)
    with pytest.raises(ValueError, match="unknown objective 'gan'.*add, d2g, ladd, regression"):
        make_objective("gan", pipe)
    with pytest.raises(ValueError, match="unknown regression loss 'l7'.*mse"):
        make_objective("regression", pipe, RegressionConfig(regression_loss="l7"))
    with pytest.raises(pydantic.ValidationError, match="student_steps"):
        ObjectiveConfig(student_steps=5)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        D2GConfig(lambda_gann=1.0)
    with pytest.raises(ValueError, match="unknown objective 'gan'.*add, d2g, ladd, regression"):
        parse_objective_config("gan", {})


def test_presets_are_the_config_classes_defaults():
    assert set(OBJECTIVE_CONFIGS) == set(objectives.OBJECTIVES) == set(objectives.DISCRIMINATORS)
    add = ADDConfig()
    assert (add.lambda_sd, add.r1_gamma, add.gan_loss, add.regression_weight) == (2.5, 1e-5, "hinge", 0.0)
    # ADD as published: 4 steps sampled uniformly, score distillation at the pairs' guidance (None
    # until resolved from the store); LADD: LADD's step probabilities and the adversarial loss alone.
    assert (add.student_steps, add.step_probs(), add.sd_guidance_scale) == (4, [1.0] * 4, None)
    ladd = LADDConfig()
    assert (ladd.student_steps, ladd.step_probs(), ladd.lambda_sd, ladd.lambda_gan) == (4, [0.7, 0.1, 0.1, 0.1],
                                                                                      0.0, 1.0)
    assert LADDConfig(student_steps=2).step_probs() == [0.7, 0.1]
    assert (ladd.add_t_logit_mean, ladd.add_t_logit_std) == (1.0, 1.0)
    assert RegressionConfig(student_steps=3).step_probs() == [1.0] * 3
    assert parse_objective_config("add", LADDConfig(student_steps=2)) == ADDConfig(student_steps=2)
    assert type(parse_objective_config("ladd", {})) is LADDConfig
    d2g = D2GConfig(mix_and_match=0.0, r1_gamma=0.0)
    assert (d2g.regression_loss, d2g.gan_loss, d2g.mix_and_match, d2g.r1_gamma, d2g.lambda_gan) == (
        "e_latent_lpips", "non_saturating", 0.0, 0.0, 0.1)
    regression = RegressionConfig(regression_loss="pseudo_huber")
    assert (regression.regression_weight, regression.lambda_sd) == (1.0, 0.0)
    assert not hasattr(regression, "lambda_gan"), "regression has no adversarial term to weight"


def test_options_belong_to_their_objective_and_errors_name_the_field():
    with pytest.raises(pydantic.ValidationError, match="d2g_multiscale"):
        parse_objective_config("add", {"d2g_multiscale": False})
    with pytest.raises(pydantic.ValidationError, match="add_feature_blocks"):
        parse_objective_config("d2g", {"add_feature_blocks": ["mid"]})
    with pytest.raises(pydantic.ValidationError, match="lambda_gan"):
        parse_objective_config("regression", {"lambda_gan": 0.1})
    with pytest.raises(pydantic.ValidationError, match="d2g_head_points"):
        parse_objective_config("d2g", {"d2g_head_points": ["middle"]})
    with pytest.raises(pydantic.ValidationError, match=r"sd_t_min \(990\) > sd_t_max \(980\)"):
        parse_objective_config("add", {"sd_t_min": 990})
    with pytest.raises(pydantic.ValidationError, match="must be 2 non-negative numbers"):
        parse_objective_config("add", {"student_steps": 2, "student_step_probs": [1.0]})
    typed = parse_objective_config("add", {"student_steps": 2})
    assert parse_objective_config("add", typed) is typed
    assert parse_objective_config("add", typed.model_dump(mode="json")) == typed


def test_a_config_of_another_objective_is_refused():
    with pytest.raises(ObjectiveError, match="objective 'add' takes ADDConfig, got D2GConfig"):
        make_objective("add", None, D2GConfig())
    with pytest.raises(ObjectiveError, match="objective 'add' takes ADDConfig, got LADDConfig"):
        make_objective("add", None, LADDConfig())


class _StubDiscriminator(nn.Module):
    """A discriminator kind the objective has never heard of: one scale parameter on latent means."""

    calls: list = []

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    @classmethod
    def from_config(cls, teacher_unet, schedule, config):
        return cls()

    def forward(self, x):
        return x.flatten(1).mean(dim=1, keepdim=True) * self.scale

    def generator_logits(self, fake, cond, z):
        self.calls.append("generator")
        return self(fake)

    def discriminator_logits(self, real, fake, cond, z, r1=False, forward=None):
        self.calls.append(("discriminator", r1))
        forward = self if forward is None else forward
        x = real.detach().requires_grad_(True) if r1 else real
        logits = forward(torch.cat([x, fake]))
        b = real.shape[0]
        return DiscriminatorLogits(logits[:b], logits[b:], r1_penalty(logits[:b].mean(dim=1), x) if r1 else None)


def test_the_objective_uses_any_discriminator_through_its_interface(sd15_teacher, monkeypatch):
    pipe = _load(sd15_teacher)
    monkeypatch.setitem(objectives.DISCRIMINATORS, "d2g", _StubDiscriminator)
    _StubDiscriminator.calls = []
    obj = make_objective("d2g", pipe, D2GConfig(regression_loss="mse"))
    assert isinstance(obj.discriminator, _StubDiscriminator)
    d_loss, d_logs = obj.discriminator_loss(_batch(), step=0)
    d_loss.backward()
    g_loss, g_logs = obj.generator_loss(_batch(), step=1)
    g_loss.backward()
    assert _StubDiscriminator.calls == [("discriminator", True), "generator"]
    assert {"d/r1", "d/real", "d/fake", "d/total"} <= set(d_logs) and "g/gan" in g_logs
    assert obj.discriminator.scale.grad is not None


def test_teacher_without_unet_names_the_objective():
    # A transformer-denoiser pipeline's shape (building a real one adds nothing to this check).
    dit_pipe = types.SimpleNamespace(transformer=torch.nn.Linear(1, 1), scheduler=None)
    with pytest.raises(ObjectiveError, match="objective 'd2g' needs a UNet.*transformer"):
        make_objective("d2g", dit_pipe)


def test_bad_batch_shapes_name_the_field_and_both_shapes(sd15_teacher):
    pipe = _load(sd15_teacher)
    obj = make_objective("regression", pipe)
    bad = _batch()
    bad["latent"] = torch.randn(4, 3, 8, 8)
    with pytest.raises(BatchShapeError, match=r"'latent' has shape \(4, 3, 8, 8\).*\[B, 4, H, W\]"):
        obj.generator_loss(bad, 0)
    bad = _batch()
    bad["noise"] = torch.randn(4, 4, 7, 7)
    with pytest.raises(BatchShapeError, match=r"'noise' has shape \(4, 4, 7, 7\).*multiples of 2"):
        obj.generator_loss(bad, 0)
    bad = _batch()
    bad["latent"] = torch.randn(4, 4, 16, 16)
    with pytest.raises(BatchShapeError, match=r"'latent' has shape \(4, 4, 16, 16\) but 'noise' has \(4, 4, 8, 8\)"):
        obj.generator_loss(bad, 0)
    with pytest.raises(BatchShapeError, match="no 'latent' field"):
        obj.generator_loss({"noise": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}, 0)
    with pytest.raises(ConditioningError, match="'prompt' has 3 prompts for 4 samples"):
        obj.generator_loss({**_batch(), "prompt": PROMPTS[:3]}, 0)
    with pytest.raises(ObjectiveError, match="no discriminator"):
        obj.discriminator_loss(_batch(), 0)


def test_non_finite_loss_names_term_and_step(sd15_teacher):
    pipe = _load(sd15_teacher)
    obj = make_objective("d2g", pipe, D2GConfig(regression_loss="mse"))
    batch = _batch()
    batch["latent"][1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="'generator/regression' is nan at step 7") as info:
        obj.generator_loss(batch, 7)
    assert (info.value.term, info.value.step) == ("generator/regression", 7)
    with pytest.raises(NonFiniteLossError, match="discriminator/.* at step 3"):
        obj.discriminator_loss(batch, 3)


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_stored_embeddings_match_encoded_prompts(teacher, request):
    pipe = _load(request.getfixturevalue(teacher))
    conditioner = TextConditioner(pipe)
    encoded = conditioner.encode(PROMPTS)
    batch = _batch()
    stored = {**batch, "prompt": None, "prompt_embeds": encoded.prompt_embeds}
    if encoded.pooled is not None:
        stored["pooled_prompt_embeds"] = encoded.pooled
    obj = make_objective("regression", pipe)
    torch.manual_seed(0)
    a, _ = obj.generator_loss(batch, 0)
    torch.manual_seed(0)
    b, _ = obj.generator_loss(stored, 0)
    torch.testing.assert_close(a, b)
    if encoded.pooled is not None:
        with pytest.raises(ConditioningError, match="without 'pooled_prompt_embeds'"):
            obj.generator_loss({**stored, "pooled_prompt_embeds": None}, 0)
        # Time ids are never stored (pairgen writes none): derived as the pipeline does, both ways.
        assert conditioner(batch, (8, 8)).time_ids.tolist()[0] == [16, 16, 0, 0, 16, 16]
        assert conditioner(stored, (8, 8)).time_ids.tolist()[0] == [16, 16, 0, 0, 16, 16]


@pytest.mark.parametrize("name", ["regression", "d2g", "add"])
def test_training_steps_never_call_the_vae_decoder(name, sd15_teacher):
    pipe = _load(sd15_teacher)

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE decoder was called during training")

    pipe.vae.decode = forbidden
    pipe.vae.decoder.forward = forbidden
    kwargs = {"regression_kwargs": {"allow_random": True, "width": 0.125}} if name == "d2g" else {}
    options = {"student_steps": 2 if name == "add" else 1, **kwargs}
    obj = make_objective(name, pipe, parse_objective_config(name, options))
    opt = torch.optim.SGD(obj.generator.parameters(), lr=1e-6)
    for step in range(2):
        if obj.discriminator is not None:
            loss, _ = obj.discriminator_loss(_batch(), step)
            loss.backward()
        loss, _ = obj.generator_loss(_batch(), step)
        loss.backward()
        opt.step()
    with pytest.raises(AssertionError, match="VAE decoder"):  # the trap is armed
        pipe.vae.decode(torch.zeros(1, 4, 8, 8))


def test_pixel_lpips_decodes_with_the_teachers_own_vae(sd15_teacher):
    """The one regression loss that decodes: built without a vae= option, it uses the teacher's."""
    pipe = _load(sd15_teacher)
    calls = []
    original = pipe.vae.decode
    pipe.vae.decode = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    options = {"regression_loss": "pixel_lpips", "regression_kwargs": {"allow_random": True}}
    with pytest.warns(UserWarning, match="RANDOM weights"):
        obj = make_objective("regression", pipe, parse_objective_config("regression", options))
    assert obj.regression.net.vae is pipe.vae
    loss, _ = obj.generator_loss(_batch(), 0)
    loss.backward()
    assert calls and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.generator.parameters())


def test_d2g_refuses_few_step_students_instead_of_leaking_the_target():
    """A few-step d2g would condition its discriminator on the re-noised real latent; refused by name."""
    from distill.train_config import TrainConfigError, load_train_config

    with pytest.raises(TrainConfigError, match="student_steps=2: d2g trains one-step students"):
        load_train_config(None, {"objective": "d2g", "teacher": "shapes", "objective_config": {"student_steps": 2}})
