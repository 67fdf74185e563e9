"""Differentiable latent augmentations for E-LatentLPIPS: per-sample transforms shared by each pair.

Each call draws one transform per sample (probability 1, as published) and applies it identically
to the two inputs of that pair: d(x, x) stays 0, while different pairs of a batch, and the same
pair from call to call, see different transforms. The trunk's blind spots move all the time, so
a generator cannot settle into an adversarial solution of one fixed network.

Presets, exactly the published ones: "b", "g", "c", "o", "co", "bg", "bgc", "bgco" (default "bg").
Whatever the preset, the ops run geometric ("b" then "g"), then colour ("c"), then cutout ("o"):
  b  x-flip (p=0.5), a quarter turn by k*90 degrees with k uniform in {0, 1, 2, 3} (non-square
     latents too: the content turns inside the same H x W frame), integer translation by
     round(U(-1, 1) * size / 8) pixels per axis
  g  isotropic scale 2^N(0, 0.2^2), rotation U(-pi, pi), anisotropic scale (a, 1/a) with
     a = 2^N(0, 0.2^2), a second independent rotation U(-pi, pi) (so the stretch lies along a
     random axis), fractional translation N(0, 0.125^2) of the size per axis (StyleGAN2-ADA's
     published strengths)
  c  brightness: add U(-0.5, 0.5); contrast: scale by U(0.5, 1.5) around the sample's mean;
     saturation: scale by U(0, 2) around each position's mean over channels
  o  cutout: zero a rectangle of half the height and width centred at U(0, 1)^2, with pixel
     centres at ((i + 0.5) / W, (j + 0.5) / H)
"b" and "g" compose into one affine map per sample (pixel-centred coordinates), executed as in
the published pipeline (StyleGAN2-ADA's geometric branch, which E-LatentLPIPS uses), whenever the
preset has a geometric stage:
  1. reflect-pad the batch by a margin reaching where the transformed corners land, plus the
     filter's support (one margin for the whole batch, at most size - 1 per side);
  2. upsample 2x: zero insertion and the separable symlet-6 low-pass (gain 4 overall);
  3. bilinear `grid_sample` (zeros outside, align_corners=False) on the 2x grid, the map rescaled
     to it with the half-pixel offsets that keep the filter pair aligned;
  4. the same low-pass, keep every second sample, crop the padding.
The symlet-6 pair is orthogonal, so an identity or an integer translation comes back exactly,
and a rotation or scaling is band-limited instead of aliased. A flip or quarter turn mirrors the
2x grid, which pairs the filter with its own reverse: symlets are only nearly symmetric, so the
result is the exact flip up to a small phase error (about 3% at 0.05 cycles/pixel, growing with
frequency; the tests bound it). Everything is batched on the inputs' device and differentiable
with respect to the latents. Randomness comes from torch's global RNG unless a generator is
passed (then drawn on the generator's device), so a fixed `torch.manual_seed` gives fixed
transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: tuple[str, ...] = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")
DEFAULT_PRESET = "bg"

SCALE_STD = 0.2  # log2 units, isotropic and anisotropic scale
TRANSLATE_STD = 0.125  # fraction of the size, fractional translation
INT_TRANSLATE_MAX = 0.125  # fraction of the size, integer translation
CUTOUT_SIZE = 0.5  # fraction of the size

# Symlet-6 ("sym6": least-asymmetric Daubechies, 6 vanishing moments) decomposition low-pass
# filter, i.e. PyWavelets' `pywt.Wavelet('sym6').dec_lo`, as tabulated in the PyWavelets wavelet
# browser (wavelets.pybytes.com/wavelet/sym6) and other public wavelet tables. pywt is not a
# dependency; these are a mathematical constant, and the tests check their defining properties
# (unit norm, orthogonal to the filter's own even shifts, six vanishing moments of the high-pass).
SYM6: tuple[float, ...] = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
TAPS = len(SYM6)  # 12
# Extra margin (input pixels) for the filter's reach: 2 * (taps // 4), as published.
FILTER_MARGIN = 2 * (TAPS // 4)


def validate_preset(preset: str) -> str:
    """Return `preset` if it is one of the published `PRESETS`, else raise ValueError naming them.

    Args:
        preset: the preset name.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown augmentation preset {preset!r}; valid presets: {', '.join(PRESETS)} "
            "(or augment=None for no augmentation)"
        )
    return preset


@dataclass
class AugmentParams:
    """Per-sample parameters of one draw; replaying them gives the identical transforms.

    Args:
        batch_size: B, the number of samples (pairs) drawn for.
    Attributes (each None when the preset lacks that stage):
        geometric: [B, 2, 3] `affine_grid` matrices (output -> input, normalised coordinates).
        colour: [B, 3] brightness offset, contrast factor, saturation factor.
        cutout: [B, 2] cutout centre (x, y) in [0, 1].
    """

    batch_size: int
    geometric: torch.Tensor | None = None
    colour: torch.Tensor | None = None
    cutout: torch.Tensor | None = None


def _draw(kind: str, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(n, generator=generator, device=draw_device).to(device)


def _matrices(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] from a 3x3 nested list of per-sample tensors [B] or constants."""
    return torch.stack(
        [
            torch.stack([e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for e in r], -1)
            for r in rows
        ],
        -2,
    )


def _translate_inv(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrices([[1.0, 0.0, -tx], [0.0, 1.0, -ty], [0.0, 0.0, 1.0]], tx)


def _scale_inv(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrices([[1 / sx, 0.0, 0.0], [0.0, 1 / sy, 0.0], [0.0, 0.0, 1.0]], sx)


def _rotate_inv(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _matrices([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]], cos)


def _geometric_inverse(
    preset: str, n: int, height: int, width: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Inverse (output -> input) of the composed b/g map per sample, [n, 3, 3], pixel units.

    Each op's inverse is right-multiplied in the order the ops act on the image, so the first op
    listed is the first applied.
    """
    inv = torch.eye(3, device=device).expand(n, 3, 3)
    if "b" in preset:
        flip = torch.floor(_draw("rand", n, generator, device) * 2)
        inv = inv @ _scale_inv(1 - 2 * flip, torch.ones_like(flip))
        turns = torch.floor(_draw("rand", n, generator, device) * 4).long().clamp(max=3)
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[turns]  # exact quarter turns
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[turns]
        inv = inv @ _rotate_inv(cos, sin)
        tx = torch.round((_draw("rand", n, generator, device) * 2 - 1) * INT_TRANSLATE_MAX * width)
        ty = torch.round((_draw("rand", n, generator, device) * 2 - 1) * INT_TRANSLATE_MAX * height)
        inv = inv @ _translate_inv(tx, ty)
    if "g" in preset:
        iso = torch.exp2(_draw("randn", n, generator, device) * SCALE_STD)
        inv = inv @ _scale_inv(iso, iso)
        theta = (_draw("rand", n, generator, device) * 2 - 1) * math.pi
        inv = inv @ _rotate_inv(torch.cos(theta), torch.sin(theta))
        aniso = torch.exp2(_draw("randn", n, generator, device) * SCALE_STD)
        inv = inv @ _scale_inv(aniso, 1 / aniso)
        theta = (_draw("rand", n, generator, device) * 2 - 1) * math.pi
        inv = inv @ _rotate_inv(torch.cos(theta), torch.sin(theta))
        tx = _draw("randn", n, generator, device) * TRANSLATE_STD * width
        ty = _draw("randn", n, generator, device) * TRANSLATE_STD * height
        inv = inv @ _translate_inv(tx, ty)
    return inv


def sample_params(
    preset: str,
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draw one transform per sample for latents of spatial size height x width.

    Args:
        preset: one of `PRESETS`.
        batch_size: number of samples (pairs) to draw for.
        height, width: spatial size of the latents.
        generator: source of randomness (default: torch's global RNG).
        device: where the parameters live (default: CPU).
    """
    validate_preset(preset)
    device = torch.device(device or "cpu")
    params = AugmentParams(batch_size)
    if "b" in preset or "g" in preset:
        inv = _geometric_inverse(preset, batch_size, height, width, generator, device)
        # Pixel-centred units -> affine_grid's normalised units (align_corners=False: u = x / (W/2)).
        to_norm = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], device=device))
        from_norm = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=device))
        params.geometric = (to_norm @ inv @ from_norm)[:, :2, :].contiguous()
    if "c" in preset:
        brightness = _draw("rand", batch_size, generator, device) - 0.5
        contrast = _draw("rand", batch_size, generator, device) + 0.5
        saturation = _draw("rand", batch_size, generator, device) * 2
        params.colour = torch.stack([brightness, contrast, saturation], dim=1)
    if "o" in preset:
        cx = _draw("rand", batch_size, generator, device)
        cy = _draw("rand", batch_size, generator, device)
        params.cutout = torch.stack([cx, cy], dim=1)
    return params


def _per_sample(values: torch.Tensor, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Tile per-sample values over a batch of k * batch_size samples (pairs concatenated)."""
    if x.shape[0] % batch_size:
        raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {batch_size} samples drawn")
    reps = x.shape[0] // batch_size
    return values.to(device=x.device, dtype=x.dtype).repeat(reps, *([1] * (values.ndim - 1)))


def _lowpass(x: torch.Tensor) -> torch.Tensor:
    """The sym6 low-pass normalised to unit DC gain, [TAPS], in x's dtype and device."""
    f = torch.tensor(SYM6, dtype=torch.float64)
    return (f / f.sum()).to(device=x.device, dtype=x.dtype)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling with the sym6 low-pass: zero insertion, then the separable FIR (gain 4).

    Along each axis, out[j] = 2 * sum_n f[j + 5 - 2n] x[n] with f the unit-gain sym6 filter:
    input pixel n stands at output index 2n, with the filter's delay left for `downsample2` and
    the sampling grid's odd offset to undo. Computed as a strided transposed depthwise
    convolution (groups = channels), which skips the products with the inserted zeros; the
    result equals zero insertion followed by the FIR (tested).

    Args:
        x: [N, C, H, W].
    Returns:
        [N, C, 2H, 2W].
    """
    c = x.shape[1]
    f = 2 * _lowpass(x)  # gain 2 per axis
    x = F.conv_transpose2d(
        x, f.view(1, 1, TAPS, 1).expand(c, 1, TAPS, 1), stride=(2, 1), padding=(TAPS // 2 - 1, 0), groups=c
    )
    return F.conv_transpose2d(
        x, f.view(1, 1, 1, TAPS).expand(c, 1, 1, TAPS), stride=(1, 2), padding=(0, TAPS // 2 - 1), groups=c
    )


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """The separable sym6 low-pass (unit gain), keeping every second sample, without padding.

    Along each axis, out[i] = sum_k f[k] x[2i + k]; a length L gives (L - TAPS) // 2 + 1 samples.
    After `upsample2` and a shift by an odd number 2t + 5 of fine samples this is the orthogonal
    wavelet pair: out[i] = x[i + t + 5] exactly, wherever the filters' reach stays inside the
    signal (`apply_geometric`'s sampling grid builds that offset in).

    Args:
        x: [N, C, H, W] with H, W >= TAPS.
    """
    c = x.shape[1]
    f = _lowpass(x)
    x = F.conv2d(x, f.view(1, 1, TAPS, 1).expand(c, 1, TAPS, 1), stride=(2, 1), groups=c)
    return F.conv2d(x, f.view(1, 1, 1, TAPS).expand(c, 1, 1, TAPS), stride=(1, 2), groups=c)


def _matrix_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _pixel_inverse(theta: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """[B, 3, 3] output -> input maps in pixel-centred units (origin at the image centre, one unit
    per pixel), from the stored `affine_grid` matrices [B, 2, 3]."""
    dtype = _matrix_dtype(device)
    theta = theta.to(device=device, dtype=dtype)
    last = torch.tensor([0.0, 0.0, 1.0], device=device, dtype=dtype).expand(theta.shape[0], 1, 3)
    full = torch.cat([theta, last], dim=1)
    from_norm = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=device, dtype=dtype))
    to_norm = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], device=device, dtype=dtype))
    return from_norm @ full @ to_norm


def _margins(inv: torch.Tensor, height: int, width: int) -> list[int]:
    """Reflect padding [left, right, top, bottom] shared by the whole batch.

    How far beyond the image the transformed corners reach, plus the filter's reach, clamped to
    what reflect padding allows (size - 1); rounded up.
    """
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor(
        [[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1.0, 1.0, 1.0]], device=inv.device, dtype=inv.dtype
    )
    landed = (inv @ corners)[:, :2, :]  # [B, (x, y), corner]
    beyond_low = (-landed).amax(dim=(0, 2)) - torch.tensor([cx, cy], device=inv.device, dtype=inv.dtype)
    beyond_high = landed.amax(dim=(0, 2)) - torch.tensor([cx, cy], device=inv.device, dtype=inv.dtype)
    limit = torch.tensor([width - 1, height - 1], device=inv.device, dtype=inv.dtype)
    margins = torch.stack([beyond_low, beyond_high]) + FILTER_MARGIN  # [(low, high), (x, y)]
    margins = torch.minimum(margins.clamp(min=0), limit).ceil()
    (left, top), (right, bottom) = margins.long().tolist()
    return [left, right, top, bottom]


def _fine_grid(
    inv: torch.Tensor, height: int, width: int, margins: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """`grid_sample` grid [B, 2H + TAPS - 1, 2W + TAPS - 1, 2] on the upsampled padded image.

    Output fine index r stands for output pixel (r - 5) / 2 (the `downsample2` delay, so its
    sample i is centred on r = 2i + 5); a point at input pixel p of the padded image is read at
    fine index 2p (the `upsample2` alignment). Both ends are affine, so one 3x3 map per sample.
    """
    left, right, top, bottom = margins
    fine_w, fine_h = 2 * (width + left + right), 2 * (height + top + bottom)
    delay = TAPS // 2 - 1
    mdtype, device = inv.dtype, inv.device
    # Output fine index (r, s) -> output pixel-centred coordinates.
    out_map = torch.tensor(
        [[0.5, 0.0, -(delay + width - 1) / 2], [0.0, 0.5, -(delay + height - 1) / 2], [0.0, 0.0, 1.0]],
        device=device,
        dtype=mdtype,
    )
    # Input pixel-centred coordinates -> fine index 2 * (padded pixel index) -> grid_sample's
    # normalised coordinate (align_corners=False: (2 * index + 1) / size - 1).
    in_map = torch.tensor(
        [
            [4 / fine_w, 0.0, (4 * ((width - 1) / 2 + left) + 1) / fine_w - 1],
            [0.0, 4 / fine_h, (4 * ((height - 1) / 2 + top) + 1) / fine_h - 1],
        ],
        device=device,
        dtype=mdtype,
    )
    maps = in_map @ inv @ out_map  # [B, 2, 3]
    out_h, out_w = 2 * height + TAPS - 1, 2 * width + TAPS - 1
    s, r = torch.meshgrid(
        torch.arange(out_h, device=device, dtype=mdtype),
        torch.arange(out_w, device=device, dtype=mdtype),
        indexing="ij",
    )
    base = torch.stack([r, s, torch.ones_like(r)], dim=-1).view(-1, 3)  # [out_h * out_w, 3]
    grid = base @ maps.transpose(1, 2)  # [B, out_h * out_w, 2]
    return grid.view(-1, out_h, out_w, 2).to(dtype)


def apply_geometric(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """The composed b/g warp of `params` (identity when absent), resampled as published.

    Reflect-pad by the batch's margin, upsample 2x with the sym6 low-pass, sample bilinearly
    (zeros outside the padded image) on the 2x grid, low-pass and downsample 2x back to H x W.
    Runs whenever `params` has a geometric stage, even for draws that happen to be the identity
    (the filter pair then returns `x` up to rounding). Half-precision inputs are resampled in
    float32 (sampling positions need the precision) and returned in their own dtype.

    Args:
        x: [k * B, C, H, W] latents.
        params: drawn for B samples at this H x W.
    """
    if params.geometric is None:
        return x
    if x.shape[0] % params.batch_size:
        raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {params.batch_size} samples drawn")
    height, width = x.shape[-2:]
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    inv = _pixel_inverse(params.geometric, height, width, x.device)
    margins = _margins(inv, height, width)
    fine = upsample2(F.pad(work, margins, mode="reflect"))
    grid = _fine_grid(inv, height, width, margins, work.dtype)
    grid = grid.repeat(x.shape[0] // params.batch_size, 1, 1, 1)
    warped = F.grid_sample(fine, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return downsample2(warped).to(x.dtype)


def apply_colour(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Brightness, contrast (around the sample mean), saturation (around the channel mean).

    Args:
        x: [k * B, C, H, W] latents.
        params: drawn for B samples.
    """
    if params.colour is None:
        return x
    values = _per_sample(params.colour, x, params.batch_size)[:, :, None, None, None]
    brightness, contrast, saturation = values.unbind(1)
    x = x + brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    channel_mean = x.mean(dim=1, keepdim=True)
    return (x - channel_mean) * saturation + channel_mean


def apply_cutout(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Zero a half-size rectangle per sample (pixel centres at (i + 0.5) / size).

    Args:
        x: [k * B, C, H, W] latents.
        params: drawn for B samples.
    """
    if params.cutout is None:
        return x
    h, w = x.shape[-2:]
    centre = _per_sample(params.cutout, x, params.batch_size)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    keep_x = (xs[None, :] - centre[:, :1]).abs() >= CUTOUT_SIZE / 2  # [N, W]
    keep_y = (ys[None, :] - centre[:, 1:]).abs() >= CUTOUT_SIZE / 2  # [N, H]
    keep = keep_y[:, None, :, None] | keep_x[:, None, None, :]
    return x * keep.to(x.dtype)


def apply_params(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Replay `params` on `x`: geometric, then colour, then cutout.

    Args:
        x: [k * B, C, H, W]; sample i gets the transform drawn for sample i mod B, so two inputs
            concatenated along the batch get the same transform pair by pair.
        params: from `sample_params`.
    """
    return apply_cutout(apply_colour(apply_geometric(x, params), params), params)


class LatentAugment(nn.Module):
    """Apply per-sample transforms of `preset` to two latent batches, the same one within each pair.

    Args:
        preset: one of `PRESETS` (default "bg").
    Call `forward(x, y, generator=None)` with two [B, C, H, W] batches; returns both augmented.
    """

    def __init__(self, preset: str = DEFAULT_PRESET) -> None:
        super().__init__()
        self.preset = validate_preset(preset)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw B transforms and apply transform i to both x[i] and y[i]."""
        if x.shape != y.shape:
            raise ValueError(
                f"both inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        params = sample_params(self.preset, x.shape[0], x.shape[-2], x.shape[-1], generator, x.device)
        # One pass over the concatenated batch: pair i's two inputs at i and B + i.
        both = apply_params(torch.cat([x, y], dim=0), params)
        return both[: x.shape[0]], both[x.shape[0] :]

    def extra_repr(self) -> str:
        """The preset, for the module's repr."""
        return f"preset={self.preset!r}"
