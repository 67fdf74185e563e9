"""Metric properties of LatentLPIPS / E-LatentLPIPS, the augmentations, and the regression-loss registry."""

from __future__ import annotations

import pytest
import torch

from distill.losses import REGRESSION_LOSSES, make_regression_loss
from distill.lpips import ELatentLPIPS, LatentAugment, LatentLPIPS, save_lpips
from distill.lpips.augment import apply_params, sample_params

PRESETS = ["b", "g", "c", "o", "co", "bg", "bgc", "bgco"]
WIDTH = 0.125


def make(ensemble: bool, preset: str = "bg", **kwargs) -> LatentLPIPS:
    torch.manual_seed(0)
    model = ELatentLPIPS(4, WIDTH, augment=preset, **kwargs) if ensemble else LatentLPIPS(4, WIDTH, **kwargs)
    return model.eval()


def latents(seed: int, batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_self_distance_is_zero_under_every_augmentation(preset):
    model = make(True, preset)
    x = latents(0)
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(model(x, x.clone()), torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_augmentation_is_identical_for_both_inputs_and_not_the_identity(preset):
    x = latents(1)
    changed = False
    for seed in range(4):
        torch.manual_seed(seed)
        a, b = LatentAugment(preset)(x, x.clone())
        assert torch.equal(a, b)
        assert a.shape == x.shape
        changed |= not torch.allclose(a, x)
    assert changed, f"preset {preset!r} never changed its input"


@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_reach_the_first_input(preset):
    model = make(True, preset, l1_weight=0.0)  # feature path only: the L1 term would mask a cut graph
    for p in model.parameters():
        p.requires_grad_(False)
    x = latents(2).requires_grad_(True)
    torch.manual_seed(3)
    model(x, latents(3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().sum()) > 0


def test_augmentation_replay_is_differentiable_and_matches():
    x = latents(4).requires_grad_(True)
    params = sample_params("bgco", 3, 16, 16, torch.Generator().manual_seed(0))
    out = apply_params(x, params)
    assert torch.equal(out, apply_params(x.detach(), params))
    out.square().sum().backward()
    assert float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("ensemble", [False, True])
def test_head_weights_are_used_as_stored(ensemble):
    # As published: no clamp at use. Negating every head negates the feature distance exactly.
    model = make(ensemble, "bgco", l1_weight=0.0)
    x, y = latents(19), latents(20)
    with torch.no_grad():
        for head in model.lins:
            head.model[1].weight.uniform_(0.1, 1.0)
        positive = model(x, y, torch.Generator().manual_seed(1)) if ensemble else model(x, y)
        for head in model.lins:
            head.model[1].weight.neg_()
        negative = model(x, y, torch.Generator().manual_seed(1)) if ensemble else model(x, y)
    assert (positive > 0).all()
    assert torch.allclose(negative, -positive, rtol=1e-6)
    # Calibration's projection is explicit, not part of the forward pass.
    model.clamp_weights_()
    assert all(float(head.model[1].weight.detach().max()) == 0 for head in model.lins)


def test_plain_latent_lpips_is_symmetric_and_ensemble_symmetric_for_a_shared_draw():
    x, y = latents(5), latents(6)
    with torch.no_grad():
        plain = make(False)
        assert torch.allclose(plain(x, y), plain(y, x), rtol=1e-5)
        ens = make(True, "bgco")
        d_xy = ens(x, y, generator=torch.Generator().manual_seed(7))
        d_yx = ens(y, x, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(d_xy, d_yx, rtol=1e-5)


def test_ensemble_is_deterministic_under_a_fixed_seed_and_random_otherwise():
    model = make(True, "bgco")
    x, y = latents(7), latents(8)
    with torch.no_grad():
        torch.manual_seed(11)
        first = model(x, y)
        torch.manual_seed(11)
        again = model(x, y)
        other = model(x, y)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_normalize_applies_the_vae_scaling_to_raw_latents():
    raw = latents(9) * 3 + 0.1
    torch.manual_seed(0)
    on_raw = LatentLPIPS(4, WIDTH, normalize=True, vae="sd15").eval()
    on_scaled = LatentLPIPS(4, WIDTH).eval()
    on_scaled.load_state_dict(on_raw.state_dict())
    other = latents(10)
    with torch.no_grad():
        assert torch.allclose(on_raw(raw, other), on_scaled(raw * 0.18215, other * 0.18215), rtol=1e-5)
    sd3 = LatentLPIPS(16, WIDTH, normalize=True, vae="sd3")
    assert torch.allclose(
        sd3.prepare(torch.ones(1, 16, 2, 2)), torch.full((1, 16, 2, 2), (1 - 0.0609) * 1.5305)
    )


@pytest.mark.parametrize(
    ("name", "channels", "shift", "scale"),
    [("sd15", 4, 0.0, 0.18215), ("sd21", 4, 0.0, 0.18215), ("sdxl", 4, 0.0, 0.13025),
     ("sd3", 16, 0.0609, 1.5305), ("flux", 16, 0.1159, 0.3611)],
)  # fmt: skip
def test_the_five_published_latent_spaces(name, channels, shift, scale):
    from distill.lpips import LATENT_SPACES, latent_space

    space = latent_space(name)
    assert (space.channels, space.shift, space.scale) == (channels, shift, scale)
    assert set(LATENT_SPACES) == {"sd15", "sd21", "sdxl", "sd3", "flux"}
    model = LatentLPIPS(width=WIDTH, normalize=True, vae=name)  # channels follow the space
    assert model.latent_channels == channels
    raw = torch.full((1, channels, 4, 4), 2.0)
    assert torch.allclose(model.prepare(raw), torch.full_like(raw, (2.0 - shift) * scale))


def test_a_latent_space_from_a_teacher_vae_or_its_config():
    from types import SimpleNamespace

    from distill.lpips import latent_space

    config = {"latent_channels": 16, "scaling_factor": 0.5, "shift_factor": 0.25}
    vae = SimpleNamespace(config=SimpleNamespace(**config))  # what an AutoencoderKL exposes
    for source in (config, vae):
        space = latent_space(source)
        assert (space.channels, space.shift, space.scale) == (16, 0.25, 0.5)
        model = LatentLPIPS(width=WIDTH, normalize=True, vae=source)
        assert model.latent_channels == 16
        assert torch.allclose(model.prepare(torch.ones(1, 16, 4, 4)), torch.full((1, 16, 4, 4), 0.375))
    no_shift = latent_space({"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None})
    assert no_shift.shift == 0.0
    with pytest.raises(ValueError, match="latent_channels"):
        latent_space({"scaling_factor": 0.5})
    with pytest.raises(ValueError, match="unknown vae 'sd2'"):
        latent_space("sd2")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="'bz'.*valid presets"):
        LatentAugment("bz")
    with pytest.raises(ValueError, match="normalize=True needs vae"):
        LatentLPIPS(4, WIDTH, normalize=True)
    with pytest.raises(ValueError, match="16 latent channels"):
        LatentLPIPS(4, WIDTH, vae="flux")
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        make(False)(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# --- the regression-loss registry -----------------------------------------------------------------


def test_registry_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError) as err:
        make_regression_loss("lpips")
    for name in ("mse", "pseudo_huber", "latent_lpips", "e_latent_lpips", "pixel_lpips"):
        assert name in str(err.value)
    assert set(REGRESSION_LOSSES) == {"mse", "pseudo_huber", "latent_lpips", "e_latent_lpips", "pixel_lpips"}


def test_mse_and_pseudo_huber_are_per_sample():
    pred, target = latents(11, batch=4, size=8), latents(12, batch=4, size=8)
    mse = make_regression_loss("mse")(pred, target)
    assert mse.shape == (4,)
    assert torch.allclose(mse, ((pred - target) ** 2).flatten(1).mean(1))
    huber = make_regression_loss("pseudo_huber", c=0.5)(pred, target)
    expected = torch.sqrt(((pred - target) ** 2).flatten(1).sum(1) + 0.25) - 0.5
    assert torch.allclose(huber, expected)
    default = make_regression_loss("pseudo_huber")(pred, pred)
    assert torch.allclose(default, torch.zeros(4), atol=1e-6)
    with pytest.raises(ValueError, match="c must be > 0"):
        make_regression_loss("pseudo_huber", c=0)


def test_latent_lpips_losses_need_weights_or_an_explicit_random_flag(tmp_path):
    with pytest.raises(ValueError, match="allow_random"):
        make_regression_loss("e_latent_lpips")
    torch.manual_seed(0)
    trained = LatentLPIPS(4, WIDTH)
    with torch.no_grad():
        trained.lins[0].model[1].weight.mul_(3)
    save_lpips(trained, tmp_path / "lpips.safetensors")
    loss = make_regression_loss("e_latent_lpips", weights=tmp_path / "lpips.safetensors", augment="bgco")
    assert torch.equal(loss.net.lins[0].model[1].weight, trained.lins[0].model[1].weight)
    loss.train()  # a trainer calling .train() must not switch batch norm or head dropout on
    assert not loss.net.training
    pred = latents(13, batch=2, size=8).requires_grad_(True)
    out = loss(pred, latents(14, batch=2, size=8))
    assert out.shape == (2,) and (out >= 0).all()
    out.sum().backward()
    assert pred.grad is not None and all(p.grad is None for p in loss.parameters())


def test_pixel_lpips_decodes_through_the_vae(sd15_teacher, tmp_path):
    with pytest.raises(ValueError, match="local weight files"):
        make_regression_loss("pixel_lpips", vae=sd15_teacher)
    with pytest.warns(UserWarning, match="RANDOM"):
        loss = make_regression_loss("pixel_lpips", vae=sd15_teacher, allow_random=True)
    assert loss.net.lpips.random_weights
    pred = latents(15, batch=2, size=8).requires_grad_(True)
    target = latents(16, batch=2, size=8)
    out = loss(pred, target)
    assert out.shape == (2,) and (out > 0).all()
    out.sum().backward()
    assert float(pred.grad.abs().sum()) > 0
    assert torch.allclose(loss(target, target), torch.zeros(2), atol=1e-6)


def test_pixel_lpips_loads_local_vgg_and_head_files(tmp_path):
    from distill.lpips.pixel import PixelLPIPS, build_vgg16_features

    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in build_vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "vgg.pth")
    model = PixelLPIPS(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert not model.random_weights
    assert torch.equal(model.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(model.lins[3].model[1].weight, heads["lin3.model.1.weight"])


def test_constant_target_shortcut_matches_the_joint_computation():
    # A target without gradients runs without an autograd graph; values and gradients must not change.
    model = make(False)
    x, y = latents(17), latents(18)
    split_x = x.clone().requires_grad_(True)
    model(split_x, y).sum().backward()
    joint_x, joint_y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    joint = model(joint_x, joint_y)
    joint.sum().backward()
    assert torch.allclose(model(x, y).detach(), joint.detach(), rtol=1e-5)
    assert torch.allclose(split_x.grad, joint_x.grad, rtol=1e-4, atol=1e-7)
