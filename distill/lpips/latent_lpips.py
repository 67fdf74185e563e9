"""LatentLPIPS and its ensemble E-LatentLPIPS: perceptual distance computed on diffusion latents.

Input convention (explicit, because getting it wrong silently changes the loss scale):
  * By default (`normalize=False`) inputs are **diffusion latents**: what a diffusion UNet sees and
    what `pairgen` stores, i.e. raw VAE latents already shifted and scaled by the VAE's factors
    (SD1.5: `vae.encode(x).latent_dist.sample() * 0.18215`). Roughly unit variance.
  * With `normalize=True` and `vae=<latent space>`, inputs are **raw VAE latents** (the encoder's
    output, before scaling) and the module applies `(x - shift) * scale` itself.
The trunk is trained and calibrated on diffusion latents; the optional L1 term is computed on the
same (diffusion-space) latents, before augmentation.

The distance per sample is
    sum over five taps k of  mean_{h,w}  sum_c w_{k,c} (f0_{k,c,h,w} - f1_{k,c,h,w})^2
    + l1_weight * mean_{c,h,w} |x0 - x1|
with f the trunk features unit-normalised over channels at each position,
f / sqrt(sum_c f^2 + 1e-8), and w the head weights used as stored (as the published metric does:
calibration keeps them non-negative, so a loaded head with negative weights is the file's problem,
not hidden here).

Latent spaces: the five published ones by name (`LATENT_SPACES`: sd15, sd21, sdxl, sd3, flux), or
read from a teacher VAE (an AutoencoderKL or its config: latent_channels, scaling_factor,
shift_factor); see `latent_space`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from d2g.teacher.vae import shift_and_scale

from .augment import DEFAULT_PRESET, LatentAugment
from .trunk import NUM_POOLS_REMOVED, LatentVGG16BN

NORM_EPS = 1e-8


@dataclass(frozen=True)
class LatentSpace:
    """A VAE latent space: channel count and the map raw -> diffusion latents, (raw - shift) * scale.

    Args:
        channels: latent channels.
        scale: the VAE's scaling_factor.
        shift: the VAE's shift_factor (0 when it has none).
        name: the published name, or None for one read from a VAE.
    """

    channels: int
    scale: float
    shift: float = 0.0
    name: str | None = None

    def to_diffusion(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (the encoder's output) -> diffusion latents."""
        return (raw - self.shift) * self.scale


# The five latent spaces of the published E-LatentLPIPS.
LATENT_SPACES: dict[str, LatentSpace] = {
    "sd15": LatentSpace(4, 0.18215, 0.0, "sd15"),
    "sd21": LatentSpace(4, 0.18215, 0.0, "sd21"),
    "sdxl": LatentSpace(4, 0.13025, 0.0, "sdxl"),
    "sd3": LatentSpace(16, 1.5305, 0.0609, "sd3"),
    "flux": LatentSpace(16, 0.3611, 0.1159, "flux"),
}
# Views kept for callers of the older names: name -> (shift, scale) and name -> channels.
VAE_LATENT_SCALINGS: dict[str, tuple[float, float]] = {
    k: (v.shift, v.scale) for k, v in LATENT_SPACES.items()
}
VAE_LATENT_CHANNELS: dict[str, int] = {k: v.channels for k, v in LATENT_SPACES.items()}


def latent_space(vae) -> LatentSpace:
    """Resolve a latent space from a published name, a `LatentSpace`, a VAE or a VAE config.

    Args:
        vae: one of `LATENT_SPACES` ("sd15", "sd21", "sdxl", "sd3", "flux"); a `LatentSpace`; an
            object with a `.config` (e.g. diffusers' AutoencoderKL); or a config mapping. A VAE or
            config must give `latent_channels`; `scaling_factor` defaults to 1 and `shift_factor`
            to 0 (the conventions of `d2g.teacher.vae`).
    """
    if isinstance(vae, LatentSpace):
        return vae
    if isinstance(vae, str):
        if vae not in LATENT_SPACES:
            raise ValueError(f"unknown vae {vae!r}; known: {sorted(LATENT_SPACES)}")
        return LATENT_SPACES[vae]
    if isinstance(vae, Mapping):
        vae = types.SimpleNamespace(config=types.SimpleNamespace(**vae))
    config = getattr(vae, "config", None)
    if config is None:
        raise ValueError(
            f"vae must be one of {sorted(LATENT_SPACES)}, a LatentSpace, a VAE or its config; got {type(vae).__name__}"
        )
    channels = getattr(config, "latent_channels", None)
    if channels is None:
        raise ValueError("the VAE's config has no 'latent_channels'")
    shift, scale = shift_and_scale(vae)
    return LatentSpace(int(channels), scale, shift)


def to_diffusion_latents(raw: torch.Tensor, vae) -> torch.Tensor:
    """Raw VAE latents -> diffusion latents with the shift and scale of `vae` (see `latent_space`).

    Args:
        raw: the encoder's latents [B, C, H, W].
        vae: a published name, a LatentSpace, a VAE or a VAE config.
    """
    return latent_space(vae).to_diffusion(raw)


def unit_normalize(features: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Divide each spatial position's channel vector by sqrt(sum of squares + eps).

    Args:
        features: [B, C, H, W].
        eps: added under the square root (1e-8, as published).
    """
    return features / torch.sqrt(torch.sum(features * features, dim=1, keepdim=True) + eps)


def paired_taps(
    extract: Callable[[torch.Tensor], list[torch.Tensor]], x0: torch.Tensor, x1: torch.Tensor, separable: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features of both inputs, tap by tap.

    When exactly one input needs gradients (the usual regression case: a constant target) and the
    network treats samples independently (`separable`: no train-mode batch norm), the constant one
    runs without an autograd graph, which halves the activations kept for backward. Otherwise one
    concatenated batch, so train-mode batch statistics see both inputs.

    Args:
        extract: maps a batch to its list of tap features.
        x0, x1: the two inputs, same shape.
        separable: whether `extract` treats samples independently.
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
    """Dropout then a bias-free 1x1 conv to one channel; weights are used as stored.

    Submodule names (`model.1.weight`) match the official checkpoints' `linK.model.1.weight`.
    Calibration keeps the weights non-negative with `clamp_weights_` after each step.

    Args:
        channels: channels of the tap this head weighs.
        dropout: a p=0.5 dropout before the conv (active only in train mode).
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
        """Weighted channel sum [B, 1, H, W] of `x` [B, C, H, W]."""
        return self.model(x)

    def clamp_weights_(self) -> None:
        """Project onto the non-negative orthant (after each calibration step)."""
        with torch.no_grad():
            self.model[1].weight.clamp_(min=0)


class LatentLPIPS(nn.Module):
    """LPIPS on latents with a latent VGG16-BN trunk (no augmentation).

    Args:
        latent_channels: 4 for SD1.5/2.x/SDXL, 16 for SD3/FLUX; default: the channels of `vae`
            when given, else 4.
        width: trunk channel multiplier; 1.0 (default) is the official architecture.
        l1_weight: weight of the per-sample mean |x0 - x1| term on the latents (0 disables it).
        normalize: inputs are raw VAE latents; apply `vae`'s shift and scale first (module doc).
        vae: the latent space (see `latent_space`: a published name, a VAE or its config);
            required when normalize=True, and checked against `latent_channels` when given.
        dropout: dropout in the heads (active only in train mode, i.e. during calibration).
        pools_removed: the trunk's identity max-pools (`LatentVGG16BN`): 3 for latents, 0 for a
            pixel trunk (then the inputs are images and this is a pixel LPIPS with a VGG16-BN trunk).
    Call `forward(x0, x1)` with [B, C, H, W] latents (H, W >= 4); returns the per-sample distance [B].
    """

    def __init__(
        self,
        latent_channels: int | None = None,
        width: float = 1.0,
        l1_weight: float = 1.0,
        normalize: bool = False,
        vae=None,
        dropout: bool = True,
        pools_removed: int = NUM_POOLS_REMOVED,
    ) -> None:
        super().__init__()
        space = None if vae is None else latent_space(vae)
        if normalize and space is None:
            raise ValueError(f"normalize=True needs vae= one of {sorted(LATENT_SPACES)}, a VAE or its config")
        if latent_channels is None:
            latent_channels = 4 if space is None else space.channels
        if space is not None and space.channels != latent_channels:
            raise ValueError(
                f"vae {space.name or 'config'!r} has {space.channels} latent channels, got latent_channels={latent_channels}"
            )
        self.latent_channels = latent_channels
        self.width = width
        self.l1_weight = float(l1_weight)
        self.normalize = normalize
        self.latent_space = space
        self.vae = None if space is None else space.name
        self.pools_removed = pools_removed
        self.trunk = LatentVGG16BN(latent_channels, width, pools_removed)
        self.lins = nn.ModuleList(LinearHead(c, dropout) for c in self.trunk.tap_channels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as diffusion latents: shifted and scaled when normalize=True, else unchanged."""
        return self.latent_space.to_diffusion(x) if self.normalize else x

    def feature_distance(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Head-weighted feature distance per sample [B], without the L1 term."""
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
        """Per-sample distance [B] between latents `x0` and `x1` [B, C, H, W]."""
        self._check(x0, x1)
        x0, x1 = self.prepare(x0), self.prepare(x1)
        distance = self.feature_distance(x0, x1)
        if self.l1_weight:
            distance = distance + self.l1_weight * (x0 - x1).abs().mean(dim=(1, 2, 3))
        return distance

    def clamp_weights_(self) -> None:
        """Project every head onto non-negative weights (calibration does this after each step)."""
        for head in self.lins:
            head.clamp_weights_()


class ELatentLPIPS(LatentLPIPS):
    """E-LatentLPIPS: LatentLPIPS behind a random augmentation on every call.

    The augmentation's parameters are drawn per sample and shared by the two inputs of each pair;
    it is applied in train and eval mode alike (the ensemble *is* the loss). The L1 term, when on,
    is computed on the inputs before augmentation.

    Args:
        *args, **kwargs: as for `LatentLPIPS`.
        augment: a published preset ("b", "g", "c", "o", "co", "bg", "bgc", "bgco"; default "bg"),
            or None to disable the augmentation.
    Call `forward(x0, x1, generator=None)`; `generator` fixes the draw (default: torch's global RNG).
    """

    def __init__(self, *args, augment: str | None = DEFAULT_PRESET, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augmenter = LatentAugment(augment) if augment is not None else None

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample distance [B] under one fresh augmentation draw per pair."""
        self._check(x0, x1)
        x0, x1 = self.prepare(x0), self.prepare(x1)
        l1 = (x0 - x1).abs().mean(dim=(1, 2, 3)) if self.l1_weight else None
        if self.augmenter is not None:
            x0, x1 = self.augmenter(x0, x1, generator)
        distance = self.feature_distance(x0, x1)
        return distance + self.l1_weight * l1 if l1 is not None else distance
