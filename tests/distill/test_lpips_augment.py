"""E-LatentLPIPS augmentations: per-sample draws shared within each pair, the published presets, the order of
stages, and the published geometric resampling (2x sym6 up, bilinear warp, sym6 down)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.lpips import ELatentLPIPS, LatentAugment
from distill.lpips.augment import (
    PRESETS,
    SYM6,
    AugmentParams,
    apply_colour,
    apply_cutout,
    apply_geometric,
    apply_params,
    downsample2,
    sample_params,
    upsample2,
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


# --- Resampling: the published geometric execution (pad, 2x sym6 upsampling, bilinear warp on the
# 2x grid, sym6 low-pass and 2x downsampling), checked against exact pixel operations.


def pixel_params(inverse: torch.Tensor, height: int, width: int) -> AugmentParams:
    """AugmentParams from output -> input maps [B, 3, 3] in pixel-centred units (the stored form
    is `affine_grid`'s normalised coordinates, as `AugmentParams` documents)."""
    to_norm = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], dtype=torch.float64))
    from_norm = torch.diag(torch.tensor([width / 2, height / 2, 1.0], dtype=torch.float64))
    theta = to_norm @ inverse.double() @ from_norm
    return AugmentParams(inverse.shape[0], geometric=theta[:, :2, :].float())


def rotation_inverse(degrees: float) -> torch.Tensor:
    t = math.radians(degrees)
    return torch.tensor([[math.cos(t), math.sin(t), 0.0], [-math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])


def smooth_image(channels: int = 3, size: int = 24, peak: float = 0.06) -> tuple[torch.Tensor, float]:
    """A band-limited image: per channel, two sinusoids of frequency <= `peak` cycles/pixel per
    axis. Returns the image [1, C, size, size] and its largest possible |value| (sum of amplitudes)."""
    g = torch.Generator().manual_seed(40)
    y, x = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    planes = []
    for _ in range(channels):
        fx, fy = (torch.rand(2, 2, generator=g) * 2 - 1) * peak
        phase = torch.rand(2, generator=g) * 2 * math.pi
        planes.append(
            torch.cos(2 * math.pi * (fx[0] * x + fy[0] * y) + phase[0])
            + 0.5 * torch.cos(2 * math.pi * (fx[1] * x + fy[1] * y) + phase[1])
        )
    return torch.stack(planes)[None].float(), 1.5


def flip_phase_error(peak: float) -> float:
    """max |G(nu) - 1| over |nu| <= peak (cycles/pixel) for the kernel a mirrored axis goes through.

    Mirroring the 2x grid pairs the synthesis filter with the reversed analysis filter; per axis,
    out[i] = sum_d g[d] * x_flipped[i + d] with g[d] = 2 * (f conv f)[10 - 2d], f the unit-gain
    sym6 filter. g sums to 1 (DC exact) and |G| = 1 at low frequencies (an all-pass: sym6's
    magnitude is that of its reverse), but symlets are only nearly symmetric, so G has a small
    phase error, which is what separates the result from the exact flip.
    """
    f = torch.tensor(SYM6, dtype=torch.float64)
    f = f / f.sum()
    full = torch.nn.functional.conv1d(
        f.view(1, 1, -1), f.flip(0).view(1, 1, -1), padding=len(f) - 1
    ).flatten()
    g = 2 * full[0::2]
    d = (10 - torch.arange(0, len(full), 2)) // 2
    nus = torch.linspace(-peak, peak, 201, dtype=torch.float64)
    response = (g[None, :] * torch.exp(-2j * math.pi * nus[:, None] * d[None, :].double())).sum(dim=1)
    return float((response - 1).abs().max())


def test_sym6_table_is_the_orthonormal_least_asymmetric_symlet():
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert len(h) == 12
    assert abs(float(h.sum()) - math.sqrt(2)) < 1e-10  # low-pass, DC gain sqrt(2)
    for lag in range(0, 6):  # orthonormal to its own even shifts
        assert abs(float((h[: len(h) - 2 * lag] * h[2 * lag :]).sum()) - (lag == 0)) < 1e-10
    k = torch.arange(12, dtype=torch.float64)
    high = h.flip(0) * (-1.0) ** k  # quadrature mirror high-pass
    for m in range(6):  # six vanishing moments (sym6), relative to the moment's scale
        assert abs(float((high * k**m).sum())) < 1e-8 * float((high.abs() * k**m).sum())
    assert abs(float((high * k**6).sum())) > 1.0  # and not seven
    assert SYM6[5] == max(SYM6)  # the published (PyWavelets dec_lo) order, not the reversed one


def test_upsampling_is_zero_insertion_then_the_separable_fir_with_gain_four():
    x = latents(41, batch=2, channels=3, height=9, width=7)
    f = torch.tensor(SYM6, dtype=torch.float64)
    f = (f / f.sum()).float()
    zeros = torch.zeros(2, 3, 18, 14)
    zeros[..., ::2, ::2] = x  # zero insertion
    padded = torch.nn.functional.pad(zeros, (6, 5, 6, 5))
    kernel = (2 * f).flip(0)  # a true convolution with 2f per axis: gain 4 overall
    expected = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 12, 1).expand(3, 1, 12, 1), groups=3)
    expected = torch.nn.functional.conv2d(expected, kernel.view(1, 1, 1, 12).expand(3, 1, 1, 12), groups=3)
    assert torch.allclose(upsample2(x), expected, atol=1e-5)
    # Gain 4 with three zeros per sample: a constant stays that constant away from the ends.
    assert torch.allclose(upsample2(torch.full((1, 1, 16, 16), 2.0))[..., 8:-8, 8:-8], torch.tensor(2.0))


def test_identity_forced_through_the_resampling_path_returns_the_image():
    # sym6 is orthogonal to its even shifts, so low-pass + 2x down after 2x up + low-pass is the
    # identity (perfect reconstruction), and the bilinear warp of the identity samples the 2x grid
    # exactly at pixel centres. The result is the input, borders included (reflect padding covers
    # the filters' reach), for any image, band-limited or white noise. Tolerance: float32 rounding
    # of about 30 multiply-adds of O(1) terms and of the sampling positions, ~1e-6.
    identity = pixel_params(torch.eye(3).expand(2, 3, 3), 16, 20)
    noise = latents(42, batch=2, channels=3, height=16, width=20)
    smooth = torch.nn.functional.interpolate(
        latents(43, batch=2, channels=3, height=4, width=5), size=(16, 20)
    )
    for x in (noise, smooth):
        assert torch.allclose(apply_geometric(x, identity), x, atol=1e-5)
    # The FIR pair alone, aligned by an odd fine-grid shift of 5 (as the sampling grid aligns it).
    x = latents(44, batch=1, channels=2, height=24, width=24)
    pair = downsample2(upsample2(x)[..., 5:, 5:])
    assert torch.allclose(pair, x[..., 5 : 5 + pair.shape[-2], 5 : 5 + pair.shape[-1]], atol=1e-5)
    # Without the alignment the pair is not the identity: the offset is load-bearing.
    unaligned = downsample2(upsample2(x)[..., 4:, 4:])
    assert (unaligned - x[..., 4 : 4 + unaligned.shape[-2], 4 : 4 + unaligned.shape[-1]]).abs().max() > 0.1


def exact_pixel_op(x: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel operation an integer-valued map performs: output pixel (i, j) = input pixel
    inverse @ (j, i) in pixel-centred units. Returns it and the mask of pixels whose source exists."""
    h, w = x.shape[-2:]
    i, j = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    centred = torch.stack([j - (w - 1) / 2, i - (h - 1) / 2, torch.ones_like(i)])
    source = torch.einsum("ab,bhw->ahw", inverse.double(), centred)
    sj, si = (source[0] + (w - 1) / 2).round().long(), (source[1] + (h - 1) / 2).round().long()
    valid = (sj >= 0) & (sj < w) & (si >= 0) & (si < h)
    return x[..., si.clamp(0, h - 1), sj.clamp(0, w - 1)], valid


TRANSLATIONS = [(2, 0), (0, -3), (-1, 2), (3, 3)]
MIRRORS = {
    "x-flip": [[-1, 0, 0], [0, 1, 0]],
    "quarter turn": [[0, 1, 0], [-1, 0, 0]],
    "half turn": [[-1, 0, 0], [0, -1, 0]],
    "three quarter turns": [[0, -1, 0], [1, 0, 0]],
    "x-flip, quarter turn, shift (2, -1)": [[0, -1, 2], [-1, 0, -1]],
}


@pytest.mark.parametrize("shift", TRANSLATIONS)
def test_integer_translation_is_the_exact_pixel_shift(shift):
    # An integer shift is an even shift of the 2x grid: the orthogonal pair still reconstructs
    # perfectly, so any image (white noise here) moves exactly, to float32 rounding (1e-5), at
    # every pixel whose source lies inside the image.
    tx, ty = shift
    inverse = torch.tensor([[1.0, 0.0, -tx], [0.0, 1.0, -ty], [0.0, 0.0, 1.0]])
    x = latents(45, batch=1, channels=4, height=16, width=16)
    expected, valid = exact_pixel_op(x, inverse)
    out = apply_geometric(x, pixel_params(inverse[None], 16, 16))
    assert valid.sum() >= 13 * 13
    assert torch.allclose(out[..., valid], expected[..., valid], atol=1e-5)


@pytest.mark.parametrize("name", list(MIRRORS))
def test_flips_and_quarter_turns_match_the_pixel_operation_on_band_limited_images(name):
    # A mirrored axis pairs sym6 with its reverse (see flip_phase_error): on a band-limited image
    # (frequencies <= 0.06 cycles/pixel per axis) each mirrored axis multiplies every component by
    # G(nu) with |G(nu) - 1| <= e, so with up to two mirrored axes the error is at most
    # amplitude * (2e + e^2), about 0.06 * 1.5 here; plus 1e-5 rounding. Interior: 4 pixels from
    # the border, where reflect padding and zeros beyond the margin do not reach.
    inverse = torch.tensor(MIRRORS[name] + [[0, 0, 1]], dtype=torch.float32)
    x, amplitude = smooth_image(size=24, peak=0.06)
    expected, valid = exact_pixel_op(x, inverse)
    out = apply_geometric(x, pixel_params(inverse[None], 24, 24))
    interior = torch.zeros_like(valid)
    interior[4:-4, 4:-4] = True
    interior &= valid
    e = flip_phase_error(0.06)
    assert e < 0.04
    error = (out - expected)[..., interior].abs().max()
    assert error <= amplitude * (2 * e + e * e) + 1e-5, (name, float(error))


@pytest.mark.parametrize("degrees", [20.0, 30.0])
def test_rotated_checkerboard_is_attenuated_not_aliased(degrees):
    # A pixel checkerboard sits at Nyquist on both axes; turned by any angle that is not a
    # multiple of 90 degrees, all of its frequency components land beyond Nyquist, so the
    # band-limited answer is 0. Bilinear sampling of the 1x grid folds them back instead: its
    # interior RMS stays near 1/3 at every angle (a moire of the +-1 pattern). The published
    # pipeline low-passes before and after the warp and removes most of it (RMS 0.18 at 20
    # degrees, 0.12 at 30; below ~10 degrees the folded frequencies sit in sym6's transition band
    # and neither method can remove them).
    n = 32
    index = torch.arange(n)
    checkerboard = ((-1.0) ** (index[:, None] + index[None, :]))[None, None]
    params = pixel_params(rotation_inverse(degrees)[None], n, n)
    out = apply_geometric(checkerboard, params)[0, 0, 8:-8, 8:-8]
    rms = float(out.square().mean().sqrt())
    assert rms < 0.6 / 3, f"aliased: interior RMS {rms:.3f} at {degrees} degrees"
    # Not by blurring everything: band-limited content turns accurately (bilinear on the 1x
    # grid is off by ~0.06 here, the 2x pipeline by ~0.015).
    y, x = torch.meshgrid((index - (n - 1) / 2).double(), (index - (n - 1) / 2).double(), indexing="ij")

    def pattern(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        return torch.cos(2 * math.pi * (0.09 * px + 0.04 * py) + 0.3) + 0.5 * torch.sin(
            2 * math.pi * (-0.03 * px + 0.07 * py)
        )

    inverse = rotation_inverse(degrees).double()
    expected = pattern(inverse[0, 0] * x + inverse[0, 1] * y, inverse[1, 0] * x + inverse[1, 1] * y)
    turned = apply_geometric(pattern(x, y).float()[None, None], params)[0, 0].double()
    error = float((turned - expected)[8:-8, 8:-8].abs().max())
    assert error < 0.03, f"band-limited pattern off by {error:.3f}"


def test_resampling_keeps_pairs_identical_is_linear_and_differentiable():
    params = sample_params("bg", 2, 8, 8, torch.Generator().manual_seed(46))
    x = latents(47, batch=2, channels=2, height=8, width=8)
    both = apply_geometric(torch.cat([x, x.clone()]), params)
    assert torch.equal(both[:2], both[2:])  # the same transform, bit for bit, within each pair
    # Gradients: the analytic gradient of the whole pipeline (pad, FIRs, grid_sample) matches
    # finite differences in float64.
    x64 = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: apply_geometric(t, params), (x64,), eps=1e-6, atol=1e-6)
    # Constants survive (DC gain 1 through gain-4 up and unit-gain down), here with margins
    # wide enough that the warp reads no zeros.
    flat = apply_geometric(
        torch.full((2, 1, 8, 8), 3.0), sample_params("b", 2, 8, 8, torch.Generator().manual_seed(48))
    )
    assert torch.allclose(flat, torch.tensor(3.0), atol=1e-5)


def test_half_precision_is_resampled_in_float32_and_returned_in_its_dtype():
    params = sample_params("bg", 2, 16, 16, torch.Generator().manual_seed(49))
    x = latents(50, batch=2)
    out = apply_geometric(x.bfloat16(), params)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), apply_geometric(x.bfloat16().float(), params), atol=0.05)


def test_e_latent_lpips_with_the_published_resampling_is_zero_on_pairs_and_passes_gradients():
    torch.manual_seed(51)
    model = ELatentLPIPS(4, 0.125, augment="bg", l1_weight=0.0).eval().requires_grad_(False)
    x, y = latents(52), latents(53)
    with torch.no_grad():
        assert torch.allclose(model(x, x.clone()), torch.zeros(4), atol=1e-6)
    x = x.requires_grad_(True)
    model(x, y, torch.Generator().manual_seed(54)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
