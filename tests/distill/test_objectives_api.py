"""Objective construction, configuration presets, conditioning paths and bad input."""

from __future__ import annotations

import types

import pydantic
import pytest
import torch

from distill.conditioning import ConditioningError, TextConditioner
from distill.objectives import (
    BatchShapeError,
    NonFiniteLossError,
    ObjectiveConfig,
    ObjectiveError,
    make_objective,
    resolve_config,
)
from tests.helpers.objectives import PROMPTS


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _batch(n=4, scale=1.0):
    return {"noise": torch.randn(n, 4, 8, 8), "latent": torch.randn(n, 4, 8, 8) * scale, "prompt": PROMPTS[:n]}


def test_unknown_names_list_the_valid_ones(sd15_teacher):
    pipe = _load(sd15_teacher)
    with pytest.raises(ValueError, match="unknown objective 'gan'.*add, d2g, regression"):
        make_objective("gan", pipe)
    with pytest.raises(ValueError, match="unknown regression loss 'l7'.*mse"):
        make_objective("regression", pipe, ObjectiveConfig(regression_loss="l7"))
    with pytest.raises(pydantic.ValidationError, match="student_steps"):
        ObjectiveConfig(student_steps=5)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ObjectiveConfig(lambda_gann=1.0)


def test_presets_and_overrides():
    assert resolve_config("add", ObjectiveConfig()).lambda_sd == 2.5
    assert resolve_config("add", ObjectiveConfig()).r1_gamma == 1e-5
    assert resolve_config("add", ObjectiveConfig()).gan_loss == "hinge"
    d2g = resolve_config("d2g", ObjectiveConfig(mix_and_match=0.0, r1_gamma=0.0))
    assert (d2g.regression_loss, d2g.gan_loss, d2g.mix_and_match, d2g.r1_gamma) == (
        "e_latent_lpips", "non_saturating", 0.0, 0.0)
    assert resolve_config("regression", ObjectiveConfig(regression_loss="pseudo_huber")).lambda_gan == 0.0


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
    obj = make_objective("d2g", pipe, ObjectiveConfig(regression_loss="mse"))
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
        assert conditioner(batch, (8, 8)).time_ids.tolist()[0] == [16, 16, 0, 0, 16, 16]


@pytest.mark.parametrize("name", ["regression", "d2g", "add"])
def test_training_steps_never_call_the_vae_decoder(name, sd15_teacher):
    pipe = _load(sd15_teacher)

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE decoder was called during training")

    pipe.vae.decode = forbidden
    pipe.vae.decoder.forward = forbidden
    kwargs = {"regression_kwargs": {"allow_random": True, "width": 0.125}} if name == "d2g" else {}
    obj = make_objective(name, pipe, ObjectiveConfig(student_steps=2 if name == "add" else 1, **kwargs))
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
