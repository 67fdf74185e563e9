"""Differentiable latent augmentations for E-LatentLPIPS: one random transform per call, shared.

Each call draws one random transform and applies it identically to both inputs (and to every
sample of the batch), so d(x, x) stays 0 while the trunk's blind spots move from call to call:
a generator cannot settle into an adversarial solution of one fixed network.

Presets (letters combine, e.g. "bg", "bgco"; the transform is the composition of every op of
every letter, each with freshly drawn parameters, probability 1 as in the paper):
  b  x-flip, rotation by a multiple of 90 degrees, integer translation (up to 1/8 of the size)
  g  isotropic scale, rotation, anisotropic scale, fractional translation (one affine warp)
  c  brightness, contrast, saturation (saturation = spread of the channels around their mean)
  o  cutout: a random rectangle of half the height and width set to zero
Parameter ranges follow the usual differentiable-augmentation conventions (StyleGAN2-ADA
strengths at p=1). Randomness comes from torch's global RNG unless a generator is passed, so a
fixed `torch.manual_seed` gives fixed transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine
from torch import nn

PRESET_LETTERS = "bgco"
DEFAULT_PRESET = "bg"


def validate_preset(preset: str) -> str:
    if not preset:
        raise ValueError(f"augmentation preset must be a non-empty combination of {PRESET_LETTERS!r}")
    bad = sorted(set(preset) - set(PRESET_LETTERS))
    if bad:
        raise ValueError(
            f"unknown augmentation letter(s) {bad} in preset {preset!r}; valid letters: {PRESET_LETTERS!r}"
        )
    return preset


@dataclass
class AugmentParams:
    """One drawn transform; replaying it on another tensor gives the identical transform."""

    ops: list[tuple[str, dict]] = field(default_factory=list)


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def _randn(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _lognormal(generator: torch.Generator | None, std: float) -> float:
    return float(torch.exp(_randn(generator, 1) * std))


def sample_params(
    preset: str, height: int, width: int, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw one transform for latents of spatial size height x width."""
    validate_preset(preset)
    params = AugmentParams()
    for letter in preset:
        if letter == "b":
            flip = bool(_rand(generator, 1) < 0.5)
            # Odd quarter turns swap height and width; only square latents may take them.
            turns = (
                int(_rand(generator, 1) * 4) % 4
                if height == width
                else 2 * (int(_rand(generator, 1) * 2) % 2)
            )
            max_dy, max_dx = max(1, height // 8), max(1, width // 8)
            dy = int(torch.randint(-max_dy, max_dy + 1, (1,), generator=generator))
            dx = int(torch.randint(-max_dx, max_dx + 1, (1,), generator=generator))
            params.ops.append(("b", {"flip": flip, "turns": turns, "dy": dy, "dx": dx}))
        elif letter == "g":
            params.ops.append(
                (
                    "g",
                    {
                        "iso": _lognormal(generator, 0.2 * math.log(2)),
                        "angle": float((_rand(generator, 1) * 2 - 1) * math.pi),
                        "aniso": _lognormal(generator, 0.2 * math.log(2)),
                        "tx": float(_randn(generator, 1) * 0.125),
                        "ty": float(_randn(generator, 1) * 0.125),
                    },
                )
            )
        elif letter == "c":
            params.ops.append(
                (
                    "c",
                    {
                        "brightness": float(_randn(generator, 1) * 0.2),
                        "contrast": _lognormal(generator, 0.5 * math.log(2)),
                        "saturation": _lognormal(generator, math.log(2)),
                    },
                )
            )
        elif letter == "o":
            cy, cx = float(_rand(generator, 1)), float(_rand(generator, 1))
            params.ops.append(("o", {"cy": cy, "cx": cx, "size": 0.5}))
    return params


def _integer_translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    # Reflect-pad then crop: an exact integer shift without wrapping content around the border.
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    pad_y, pad_x = min(abs(dy), h - 1), min(abs(dx), w - 1)
    padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    top = pad_y - max(-pad_y, min(pad_y, dy))
    left = pad_x - max(-pad_x, min(pad_x, dx))
    return padded[..., top : top + h, left : left + w]


def _apply_b(x: torch.Tensor, p: dict) -> torch.Tensor:
    if p["flip"]:
        x = torch.flip(x, dims=(-1,))
    if p["turns"]:
        x = torch.rot90(x, k=p["turns"], dims=(-2, -1))
    return _integer_translate(x, p["dy"], p["dx"])


def _apply_g(x: torch.Tensor, p: dict) -> torch.Tensor:
    b, _, h, w = x.shape
    cos, sin = math.cos(p["angle"]), math.sin(p["angle"])
    sx, sy = p["iso"] * p["aniso"], p["iso"] / p["aniso"]
    # Linear part R @ S about the centre, then a translation in units of the latent size.
    a = torch.tensor([[cos * sx, -sin * sy], [sin * sx, cos * sy]], dtype=x.dtype, device=x.device)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=x.dtype, device=x.device)
    shift = torch.tensor([p["tx"] * w, p["ty"] * h], dtype=x.dtype, device=x.device)
    offset = centre - a @ centre + shift
    matrix = torch.cat([a, offset[:, None]], dim=1).expand(b, 2, 3)
    return warp_affine(
        x, matrix, dsize=(h, w), mode="bilinear", padding_mode="reflection", align_corners=True
    )


def _apply_c(x: torch.Tensor, p: dict) -> torch.Tensor:
    x = x + p["brightness"]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p["contrast"] + mean
    channel_mean = x.mean(dim=1, keepdim=True)
    return (x - channel_mean) * p["saturation"] + channel_mean


def _apply_o(x: torch.Tensor, p: dict) -> torch.Tensor:
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[:, None] / max(h - 1, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, :] / max(w - 1, 1)
    half = p["size"] / 2
    inside = ((ys - p["cy"]).abs() < half) & ((xs - p["cx"]).abs() < half)
    return x * (~inside).to(x.dtype)


_APPLY = {"b": _apply_b, "g": _apply_g, "c": _apply_c, "o": _apply_o}


def apply_params(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    for letter, p in params.ops:
        x = _APPLY[letter](x, p)
    return x


class LatentAugment(nn.Module):
    """Apply one freshly drawn transform of `preset` identically to two latent batches."""

    def __init__(self, preset: str = DEFAULT_PRESET) -> None:
        super().__init__()
        self.preset = validate_preset(preset)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != y.shape:
            raise ValueError(
                f"both inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        params = sample_params(self.preset, x.shape[-2], x.shape[-1], generator)
        # One pass over the concatenated batch: the same transform, half the kernel launches.
        both = apply_params(torch.cat([x, y], dim=0), params)
        return both[: x.shape[0]], both[x.shape[0] :]

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}"
