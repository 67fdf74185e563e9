"""LatentLPIPS and its ensemble E-LatentLPIPS: perceptual distance computed on diffusion latents.

Input convention (explicit, because getting it wrong silently changes the loss scale):
  * By default (`normalize=False`) inputs are **diffusion latents**: what a diffusion UNet sees and
    what `pairgen` stores, i.e. raw VAE latents already shifted and scaled by the VAE's factors
    (SD1.5: `vae.encode(x).latent_dist.sample() * 0.18215`). Roughly unit variance.
  * With `normalize=True` and `vae=<name>`, inputs are **raw VAE latents** (the encoder's output,
    before scaling) and the module applies `(x - shift) * scale` itself.
The trunk is trained and calibrated on diffusion latents; the optional L1 term is computed on the
same (diffusion-space) latents, before augmentation.

The distance per sample is
    sum over five taps k of  mean_{h,w}  sum_c w_{k,c} (f0_{k,c,h,w} - f1_{k,c,h,w})^2
with f the trunk features unit-normalised over channels at each position and w >= 0 the head
weights (clamped at use, so a distance can never be negative whatever weights were loaded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import DEFAULT_PRESET, LatentAugment
from .trunk import LatentVGG16BN

# name -> (shift, scale): diffusion_latent = (raw_latent - shift) * scale.
VAE_LATENT_SCALINGS: dict[str, tuple[float, float]] = {
    "sd15": (0.0, 0.18215),
    "sd21": (0.0, 0.18215),
    "sdxl": (0.0, 0.13025),
    "sd3": (0.0609, 1.5305),
    "flux": (0.1159, 0.3611),
}
VAE_LATENT_CHANNELS: dict[str, int] = {"sd15": 4, "sd21": 4, "sdxl": 4, "sd3": 16, "flux": 16}


def to_diffusion_latents(raw: torch.Tensor, vae: str) -> torch.Tensor:
    """Raw VAE latents -> diffusion latents with the named VAE's shift and scale."""
    if vae not in VAE_LATENT_SCALINGS:
        raise ValueError(f"unknown vae {vae!r}; known: {sorted(VAE_LATENT_SCALINGS)}")
    shift, scale = VAE_LATENT_SCALINGS[vae]
    return (raw - shift) * scale


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial position's channel vector by its L2 norm."""
    norm = torch.sqrt(torch.sum(features * features, dim=1, keepdim=True))
    return features / (norm + eps)


def paired_taps(
    extract: Callable[[torch.Tensor], list[torch.Tensor]], x0: torch.Tensor, x1: torch.Tensor, separable: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features of both inputs, tap by tap.

    When exactly one input needs gradients (the usual regression case: a constant target) and the
    network treats samples independently (`separable`: no train-mode batch norm), the constant one
    runs without an autograd graph, which halves the activations kept for backward. Otherwise one
    concatenated batch, so train-mode batch statistics see both inputs.
    """
    if separable and torch.is_grad_enabled() and x0.requires_grad != x1.requires_grad:
        live, const = (x0, x1) if x0.requires_grad else (x1, x0)
        live_taps = extract(live)
        with torch.no_grad():
            const_taps = extract(const)
        pairs = zip(live_taps, const_taps, strict=True)
        return [(a, b) if x0.requires_grad else (b, a) for a, b in pairs]
    return [tuple(t.chunk(2, dim=0)) for t in extract(torch.cat([x0, x1], dim=0))]


class LinearHead(nn.Module):
    """Dropout then a bias-free 1x1 conv to one channel; weights are clamped non-negative at use.

    Submodule names (`model.1.weight`) match the official checkpoints' `linK.model.1.weight`.
    """

    def __init__(self, channels: int, dropout: bool = True) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Dropout(0.5) if dropout else nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False)
        )
        # Equal positive weights: an uncalibrated head is the plain channel sum of squared
        # differences (LPIPS's "baseline" distance), a usable loss even before calibration.
        nn.init.ones_(self.model[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.model[0](x), self.model[1].weight.clamp(min=0))

    def clamp_weights_(self) -> None:
        """Project onto the non-negative orthant (after each calibration step)."""
        with torch.no_grad():
            self.model[1].weight.clamp_(min=0)


class LatentLPIPS(nn.Module):
    """LPIPS on latents with a latent VGG16-BN trunk (no augmentation).

    Args:
        latent_channels: 4 for SD1.5/2.x/SDXL, 16 for SD3/FLUX.
        width: trunk channel multiplier; 1.0 (default) is the official architecture.
        l1_weight: weight of the per-sample mean |x0 - x1| term on the latents (0 disables it).
        normalize: inputs are raw VAE latents; apply `vae`'s scaling first (see module doc).
        vae: one of VAE_LATENT_SCALINGS; required when normalize=True.
        dropout: dropout in the heads (active only in train mode, i.e. during calibration).
    Call `forward(x0, x1)` with [B, C, H, W] latents; returns the per-sample distance [B].
    """

    def __init__(
        self,
        latent_channels: int = 4,
        width: float = 1.0,
        l1_weight: float = 1.0,
        normalize: bool = False,
        vae: str | None = None,
        dropout: bool = True,
    ) -> None:
        super().__init__()
        if normalize and vae is None:
            raise ValueError(f"normalize=True needs vae= one of {sorted(VAE_LATENT_SCALINGS)}")
        if vae is not None and vae not in VAE_LATENT_SCALINGS:
            raise ValueError(f"unknown vae {vae!r}; known: {sorted(VAE_LATENT_SCALINGS)}")
        if vae is not None and VAE_LATENT_CHANNELS[vae] != latent_channels:
            raise ValueError(
                f"vae {vae!r} has {VAE_LATENT_CHANNELS[vae]} latent channels, got latent_channels={latent_channels}"
            )
        self.latent_channels = latent_channels
        self.width = width
        self.l1_weight = float(l1_weight)
        self.normalize = normalize
        self.vae = vae
        self.trunk = LatentVGG16BN(latent_channels, width)
        self.lins = nn.ModuleList(LinearHead(c, dropout) for c in self.trunk.tap_channels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return to_diffusion_latents(x, self.vae) if self.normalize else x

    def feature_distance(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Head-weighted feature distance per sample, without the L1 term."""
        taps = paired_taps(self.trunk, x0, x1, separable=not self.trunk.training)
        total = x0.new_zeros(x0.shape[0])
        for (f0, f1), head in zip(taps, self.lins, strict=True):
            diff = unit_normalize(f0) - unit_normalize(f1)
            total = total + head(diff * diff).mean(dim=(1, 2, 3))
        return total

    def _check(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        if x0.shape != x1.shape:
            raise ValueError(f"inputs must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if x0.ndim != 4 or x0.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, H, W], got {tuple(x0.shape)}")

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        self._check(x0, x1)
        x0, x1 = self.prepare(x0), self.prepare(x1)
        distance = self.feature_distance(x0, x1)
        if self.l1_weight:
            distance = distance + self.l1_weight * (x0 - x1).abs().mean(dim=(1, 2, 3))
        return distance

    def clamp_weights_(self) -> None:
        for head in self.lins:
            head.clamp_weights_()


class ELatentLPIPS(LatentLPIPS):
    """E-LatentLPIPS: LatentLPIPS behind one random augmentation per call, shared by both inputs.

    Extra arg `augment`: a preset of letters from "bgco" (default "bg"); None disables it. The
    augmentation is applied in train and eval mode alike (the ensemble *is* the loss).
    """

    def __init__(self, *args, augment: str | None = DEFAULT_PRESET, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augmenter = LatentAugment(augment) if augment else None

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._check(x0, x1)
        x0, x1 = self.prepare(x0), self.prepare(x1)
        l1 = (x0 - x1).abs().mean(dim=(1, 2, 3)) if self.l1_weight else None
        if self.augmenter is not None:
            x0, x1 = self.augmenter(x0, x1, generator)
        distance = self.feature_distance(x0, x1)
        return distance + self.l1_weight * l1 if l1 is not None else distance
