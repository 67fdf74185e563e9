"""E-LatentLPIPS augmentations: per-sample draws shared within each pair, the published presets, the order of stages."""

from __future__ import annotations

import pytest
import torch

from distill.lpips import ELatentLPIPS, LatentAugment
from distill.lpips.augment import (
    PRESETS,
    AugmentParams,
    apply_colour,
    apply_cutout,
    apply_geometric,
    apply_params,
    sample_params,
)

PUBLISHED = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")


def latents(seed: int, batch: int = 4, channels: int = 4, height: int = 16, width: int = 16) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def test_exactly_the_published_presets_exist():
    assert PRESETS == PUBLISHED
    for preset in PUBLISHED:
        LatentAugment(preset)


@pytest.mark.parametrize("preset", ["", "gb", "cg", "bgo", "bco", "oc", "bgcoo", "x", "bz", "BG", "none"])
def test_presets_outside_the_published_set_are_refused(preset):
    with pytest.raises(ValueError, match="valid presets: b, g, c, o, co, bg, bgc, bgco") as err:
        LatentAugment(preset)
    assert repr(preset) in str(err.value)
    with pytest.raises(ValueError):
        ELatentLPIPS(4, 0.125, augment=preset)
    with pytest.raises(ValueError):
        sample_params(preset, 2, 8, 8)


@pytest.mark.parametrize("preset", PUBLISHED)
def test_pairs_of_one_batch_get_different_transforms(preset):
    x = latents(0, batch=1).expand(8, -1, -1, -1).contiguous()  # eight identical pairs
    a, b = LatentAugment(preset)(x, x.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # within a pair: the same transform
    distinct = {tuple(a[i].flatten().tolist()) for i in range(8)}
    assert len(distinct) >= 4, f"{preset!r}: {len(distinct)} distinct transforms over 8 pairs"


@pytest.mark.parametrize("preset", PUBLISHED)
def test_both_inputs_of_a_pair_get_the_same_transform(preset):
    x, y = latents(2), latents(3)
    generator = torch.Generator().manual_seed(4)
    a, b = LatentAugment(preset)(x, y, generator)
    params = sample_params(preset, 4, 16, 16, torch.Generator().manual_seed(4))
    assert torch.allclose(a, apply_params(x, params), atol=1e-6)
    assert torch.allclose(b, apply_params(y, params), atol=1e-6)


@pytest.mark.parametrize("preset", ["b", "g", "o", "bg"])
def test_linear_stages_commute_with_scaling_the_pair(preset):
    # Geometry and cutout are linear: augmenting (x, 2x) with one draw per pair gives (a, 2a).
    x = latents(5)
    a, b = LatentAugment(preset)(x, 2 * x, torch.Generator().manual_seed(6))
    assert torch.allclose(b, 2 * a, atol=1e-5)


@pytest.mark.parametrize("preset", PUBLISHED)
def test_identical_inputs_have_distance_zero_and_pairs_are_augmented_independently(preset):
    torch.manual_seed(0)
    model = ELatentLPIPS(4, 0.125, augment=preset, l1_weight=0.0).eval()
    x = latents(7)
    with torch.no_grad():
        assert torch.allclose(model(x, x.clone()), torch.zeros(4), atol=1e-6)
        # Two copies of one pair in a batch: per-sample draws give them different distances.
        pair0, pair1 = latents(8, batch=1), latents(9, batch=1)
        d = model(pair0.expand(6, -1, -1, -1), pair1.expand(6, -1, -1, -1))
    assert len({round(float(v), 6) for v in d}) >= 3, d


def test_stages_run_geometric_then_colour_then_cutout():
    # A vertical ramp: translations move the sample's mean, so contrast-then-warp differs visibly.
    x = latents(10, batch=6) + torch.linspace(-3, 3, 16)[None, None, :, None]
    params = sample_params("bgco", 6, 16, 16, torch.Generator().manual_seed(11))
    out = LatentAugment("bgco")(x, x.clone(), torch.Generator().manual_seed(11))[0]
    assert torch.allclose(
        out, apply_cutout(apply_colour(apply_geometric(x, params), params), params), atol=1e-6
    )
    # The order matters (contrast is around the mean, which the warp moves), so the check above has teeth.
    swapped = apply_cutout(apply_geometric(apply_colour(x, params), params), params)
    assert not torch.allclose(out, swapped, atol=1e-3)
    # Cutout last: each sample holds an exact, axis-aligned zero rectangle, whatever came before.
    for i in range(6):
        zero = (out[i] == 0).all(dim=0)
        rows, cols = zero.any(dim=1), zero.any(dim=0)
        assert zero.any()
        assert torch.equal(zero, rows[:, None] & cols[None, :])
        assert int(rows.sum()) <= 8 and int(cols.sum()) <= 8


def test_colour_parameters_follow_the_published_ranges():
    params = sample_params("c", 4096, 8, 8, torch.Generator().manual_seed(12))
    brightness, contrast, saturation = params.colour.unbind(1)
    for values, low, high in ((brightness, -0.5, 0.5), (contrast, 0.5, 1.5), (saturation, 0.0, 2.0)):
        assert float(values.min()) >= low and float(values.max()) <= high
        # Uniform over the whole range: 4096 draws come within 0.01 of both ends.
        assert float(values.min()) < low + 0.01 and float(values.max()) > high - 0.01
    # Each around the input's mean: brightness 0, contrast 1 and saturation 1 is the identity,
    # contrast 0 gives the sample mean everywhere, saturation 0 the channel mean at each position.
    x = latents(13, batch=1)
    identity = AugmentParams(1, colour=torch.tensor([[0.0, 1.0, 1.0]]))
    assert torch.allclose(apply_colour(x, identity), x, atol=1e-6)
    flat = apply_colour(x, AugmentParams(1, colour=torch.tensor([[0.0, 0.0, 1.0]])))
    assert torch.allclose(flat, x.mean().expand_as(x), atol=1e-6)
    grey = apply_colour(x, AugmentParams(1, colour=torch.tensor([[0.0, 1.0, 0.0]])))
    assert torch.allclose(grey, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)


def test_cutout_is_half_the_size_with_pixel_centres_at_i_plus_half():
    x = torch.ones(1, 2, 4, 8)
    out = apply_cutout(x, AugmentParams(1, cutout=torch.tensor([[0.5, 0.5]])))
    # Centres (i + 0.5) / size: rows 1-2 of 4 and columns 2-5 of 8 lie within 0.25 of the centre.
    expected = torch.ones(4, 8)
    expected[1:3, 2:6] = 0
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 1], expected)


def test_b_takes_all_four_quarter_turns_even_on_non_square_latents_and_integer_shifts():
    params = sample_params("b", 512, 8, 16, torch.Generator().manual_seed(14))
    theta = params.geometric
    odd = theta[:, 0, 0].abs() < 1e-6  # a 90 or 270 degree turn: no x -> x term
    assert 0.3 < float(odd.float().mean()) < 0.7
    # Translations are whole pixels of at most round(size / 8) = 2 (width) and 1 (height); the
    # sampling map's offset is that translation turned by the flip and quarter turn, so whole
    # pixels of at most 2 along either axis. Normalised offset * size / 2 = pixels.
    shift_px = torch.stack([theta[:, 0, 2] * 16 / 2, theta[:, 1, 2] * 8 / 2], dim=1)
    assert torch.allclose(shift_px, shift_px.round(), atol=1e-5)
    assert float(shift_px.abs().max()) == 2
    assert float(shift_px[~odd, 1].abs().max()) == 1  # not turned: the height shift stays within 1
    x = latents(15, batch=512, height=8, width=16)
    assert apply_geometric(x, params).shape == x.shape


def test_g_stretches_along_random_axes():
    # Anisotropic scaling between two independent rotations: the linear part's principal axis
    # is spread over all directions, not tied to the image axes.
    params = sample_params("g", 2048, 16, 16, torch.Generator().manual_seed(16))
    linear = params.geometric[:, :, :2].double()
    u, s, _ = torch.linalg.svd(linear)
    assert float((s[:, 0] / s[:, 1]).max()) > 1.5  # stretched, not only scaled and turned
    angle = torch.atan2(u[:, 1, 0], u[:, 0, 0]) % torch.pi
    histogram = torch.histc(angle, bins=8, min=0, max=torch.pi)
    assert float(histogram.min()) > 0.5 * 2048 / 8


def test_params_live_on_the_inputs_device_and_replay_on_concatenated_pairs():
    x = latents(17, batch=3)
    params = sample_params("bgco", 3, 16, 16, torch.Generator().manual_seed(18), device=x.device)
    assert params.geometric.shape == (3, 2, 3) and params.geometric.device == x.device
    both = apply_params(torch.cat([x, x]), params)
    assert torch.equal(both[:3], both[3:])
    with pytest.raises(ValueError, match="multiple"):
        apply_params(latents(19, batch=4), params)
