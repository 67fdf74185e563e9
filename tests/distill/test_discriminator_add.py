"""ADD/LADD discriminator: frozen teacher features, trainable conditioned heads, R1 on head inputs."""

from __future__ import annotations

import pytest
import torch

from distill.discriminators.add import ADDDiscriminator
from distill.objective_config import ADDConfig
from distill.objectives import ObjectiveError, make_objective
from tests.helpers.objectives import PROMPTS


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def test_only_heads_are_parameters_and_forward_stops_early(sd15_teacher):
    pipe = _load(sd15_teacher)
    disc = ADDDiscriminator(pipe.unet, ["down0"])
    assert all(k.startswith("heads.") for k in disc.state_dict())
    assert sum(p.numel() for p in disc.parameters()) < sum(p.numel() for p in pipe.unet.parameters()) / 4
    calls = []
    handle = pipe.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        from distill.conditioning import TextConditioner

        cond = TextConditioner(pipe)({"latent": torch.zeros(2), "prompt": PROMPTS[:2]}, (8, 8))
        feats = disc.extract(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), cond)
    finally:
        handle.remove()
    assert calls == [], "the decoder must not run when only encoder features are tapped"
    assert len(feats) == 1 and feats[0].shape[0] == 2
    assert disc(feats, torch.tensor([10, 900]), cond.summary_vector()).shape == (2, 1)


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_gradients_reach_every_trainable_part_and_no_frozen_part(teacher, request):
    pipe = _load(request.getfixturevalue(teacher))
    obj = make_objective("add", pipe, ADDConfig(student_steps=2, sd_guidance_scale=2.0))
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}
    g_loss, g_logs = obj.generator_loss(batch, step=3)
    assert set(g_logs) == {"g/gan", "g/score_distillation", "g/total"}
    g_loss.backward()
    assert all(p.grad is not None for p in obj.generator.parameters())
    assert all(p.grad is None for p in obj.discriminator.parameters())

    d_loss, d_logs = obj.discriminator_loss(batch, step=0)
    assert d_logs["d/r1"] > 0
    obj.generator.zero_grad(set_to_none=True)
    d_loss.backward()
    for name, p in obj.discriminator.named_parameters():
        assert p.grad is not None, name
        # The logit bias cancels between the real and fake hinge terms at init; every weight moves.
        if name.endswith("weight"):
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in obj.generator.parameters())
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert all(p.grad is None for p in module.parameters())


def test_unknown_feature_block_names_the_option(sd15_teacher):
    pipe = _load(sd15_teacher)
    with pytest.raises(ObjectiveError, match="add_feature_blocks.*'down7'"):
        make_objective("add", pipe, ADDConfig(add_feature_blocks=["down7"]))


def test_discriminator_learns_to_separate_real_from_fake(sdxl_teacher):
    """With the student fixed, D's hinge loss falls and real logits rise above fake ones."""
    pipe = _load(sdxl_teacher)
    torch.manual_seed(0)
    # One step (the preset has 4): a few-step student's later steps start from the re-noised reals,
    # so its fakes would sit close to them; this test is about D learning, not about the student.
    obj = make_objective("add", pipe, ADDConfig(add_feature_blocks=["down1", "mid"], student_steps=1))
    batch = {"noise": torch.randn(8, 4, 8, 8), "latent": torch.randn(8, 4, 8, 8) * 3 + 2, "prompt": PROMPTS * 2}
    opt = torch.optim.Adam(obj.discriminator.parameters(), lr=3e-3)
    losses = []
    for step in range(1, 31):
        opt.zero_grad()
        loss, logs = obj.discriminator_loss(batch, step)
        loss.backward()
        opt.step()
        losses.append(logs["d/total"])
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert logs["d/logit_real"] > logs["d/logit_fake"]
