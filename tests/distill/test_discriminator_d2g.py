"""Diffusion2GAN discriminator: zero-initialised branches, readout taps, switches, gradients."""

from __future__ import annotations

import pytest
import torch

from distill.conditioning import TextConditioner
from distill.discriminators.d2g import D2GDiscriminator
from distill.objective_config import D2GConfig
from distill.objectives import make_objective
from tests.helpers.objectives import PROMPTS


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _teacher_taps(unet) -> tuple[dict, list]:
    """Record the teacher's activations at the same points, independently of the discriminator's hooks."""
    store, handles = {}, []
    for i, block in enumerate(unet.up_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: store.__setitem__(f"up{i}.before", k["hidden_states"].clone()), with_kwargs=True))
        handles.append(block.resnets[0].register_forward_pre_hook(
            lambda m, a, i=i: store.__setitem__(f"up{i}.skip", a[0].clone())))
        if block.upsamplers:
            handles.append(block.upsamplers[0].register_forward_pre_hook(
                lambda m, a, i=i: store.__setitem__(f"up{i}.after", a[0].clone())))
        else:
            handles.append(block.register_forward_hook(
                lambda m, a, o, i=i: store.__setitem__(f"up{i}.after", o.clone())))
    return store, handles


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_zero_initialised_branches_keep_teacher_activations(teacher, request):
    pipe = _load(request.getfixturevalue(teacher))
    disc = D2GDiscriminator(pipe.unet, timestep=0)
    latent, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond = TextConditioner(pipe)({"latent": latent, "prompt": PROMPTS[:2]}, (8, 8))
    store, handles = _teacher_taps(pipe.unet)
    try:
        with torch.no_grad():
            pipe.unet(latent, torch.zeros(2, dtype=torch.long), **cond.unet_kwargs())
            logits, features = disc(latent, cond, z=z, return_features=True)
    finally:
        for h in handles:
            h.remove()
    n_up = len(pipe.unet.up_blocks)
    assert sorted(features) == sorted(f"up{i}.{p}" for i in range(n_up) for p in ("before", "skip", "after"))
    assert logits.shape == (2, 3 * n_up)
    for name, feat in features.items():
        torch.testing.assert_close(feat, store[name], rtol=1e-5, atol=1e-5, msg=name)

    # The branches are live: once their convs are non-zero, the backbone's activations move.
    with torch.no_grad():
        disc.z_conv.weight.normal_(std=0.1)
        for conv in disc.ms_convs:
            conv.weight.normal_(std=0.1)
        _, moved = disc(latent, cond, z=z, return_features=True)
    assert not torch.allclose(moved["up0.before"], store["up0.before"], atol=1e-4)


def test_deepcopy_rebinds_hooks_to_the_copy(sd15_teacher):
    import copy

    pipe = _load(sd15_teacher)
    disc = D2GDiscriminator(pipe.unet)
    twin = copy.deepcopy(disc)
    with torch.no_grad():
        twin.z_conv.weight.normal_(std=0.5)
    latent, z = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    cond = TextConditioner(pipe)({"latent": latent, "prompt": ["a cat"]}, (8, 8))
    with torch.no_grad():
        a, b = disc(latent, cond, z=z), twin(latent, cond, z=z)
        again = disc(latent, cond, z=z)
    torch.testing.assert_close(a, again)
    assert not torch.allclose(a, b)


def test_switches_change_the_architecture(sd15_teacher):
    pipe = _load(sd15_teacher)
    plain = D2GDiscriminator(pipe.unet, z_conditioning=False, multiscale=False, readout_heads=False)
    assert plain.z_conv is None and plain.ms_convs is None and list(plain.heads) == ["up1_after"]
    cond = TextConditioner(pipe)({"latent": torch.zeros(1), "prompt": ["a cat"]}, (8, 8))
    assert plain(torch.randn(1, 4, 8, 8), cond).shape == (1, 1)
    full = D2GDiscriminator(pipe.unet)
    with pytest.raises(ValueError, match="z conditioning"):
        full(torch.randn(1, 4, 8, 8), cond)
    with pytest.raises(ValueError, match="head points"):
        D2GDiscriminator(pipe.unet, head_points=("middle",))
    # The dropped output conv is not a parameter: every parameter feeds a head.
    assert not any(k.startswith("unet.conv_out") for k, _ in full.named_parameters())


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_gradients_reach_every_trainable_part_and_no_frozen_part(teacher, request):
    pipe = _load(request.getfixturevalue(teacher))
    obj = make_objective("d2g", pipe, D2GConfig(regression_kwargs={"allow_random": True, "width": 0.125}))
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8) * 5, "prompt": PROMPTS}

    g_loss, g_logs = obj.generator_loss(batch, step=1)
    g_loss.backward()
    assert set(g_logs) == {"g/regression", "g/gan", "g/total"}
    assert all(p.grad is not None for p in obj.generator.parameters())
    assert all(p.grad is None for p in obj.discriminator.parameters()), "G step must not build D parameter grads"
    assert not any(p.requires_grad for p in obj.discriminator.parameters()), "D stays frozen until its own step"

    d_loss, d_logs = obj.discriminator_loss(batch, step=0)  # step 0: lazy R1 is due
    assert all(p.requires_grad for p in obj.discriminator.parameters())
    assert d_logs["d/r1"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in d_logs.values())
    obj.generator.zero_grad(set_to_none=True)
    d_loss.backward()
    for name, p in obj.discriminator.named_parameters():
        assert p.grad is not None, name
    # Zero-initialised branches still learn: their weights get non-zero gradients.
    assert obj.discriminator.z_conv.weight.grad.abs().sum() > 0
    assert all(c.weight.grad.abs().sum() > 0 for c in obj.discriminator.ms_convs)
    assert all(p.grad is None for p in obj.generator.parameters()), "D step must not build G grads"
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert all(p.grad is None for p in module.parameters())


def test_r1_is_lazy_and_mix_and_match_replaces_fakes(sd15_teacher):
    pipe = _load(sd15_teacher)
    obj = make_objective("d2g", pipe, D2GConfig(regression_loss="mse", r1_every=4, mix_and_match=0.5))
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}
    assert "d/r1" in obj.discriminator_loss(batch, step=8)[1]
    assert "d/r1" not in obj.discriminator_loss(batch, step=9)[1]
    off = make_objective("d2g", pipe, D2GConfig(regression_loss="mse", r1_gamma=0.0))
    assert "d/r1" not in off.discriminator_loss(batch, step=0)[1]

    real, fake = batch["latent"], torch.randn(4, 4, 8, 8)
    mixed = obj._mix_and_match(fake, real)
    torch.testing.assert_close(mixed[:2], real.roll(1, dims=0)[:2])
    torch.testing.assert_close(mixed[2:], fake[2:])
    assert not torch.equal(off._mix_and_match(fake, real), fake)  # the d2g preset mixes 25%
    none = make_objective("d2g", pipe, D2GConfig(regression_loss="mse", mix_and_match=0.0))
    assert torch.equal(none._mix_and_match(fake, real), fake)
