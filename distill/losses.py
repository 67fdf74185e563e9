"""Regression losses between predicted and target diffusion latents, behind one registry.

Every loss maps (pred, target) latents [B, C, H, W] to a per-sample loss [B]; the caller reduces.
The trainer builds losses only through `make_regression_loss`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distill.objective_config import PACKAGED_LPIPS, PACKAGED_PIXEL_LPIPS


class MSELoss(nn.Module):
    """Mean squared error per sample."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] of latents [B, ...]."""
        return ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))


class PseudoHuberLoss(nn.Module):
    """sqrt(||pred - target||^2 + c^2) - c per sample (consistency models).

    `c=None` uses the improved-consistency-training rule c = 0.00054 * sqrt(C*H*W).
    """

    def __init__(self, c: float | None = None) -> None:
        super().__init__()
        if c is not None and c <= 0:
            raise ValueError(f"pseudo_huber c must be > 0, got {c}")
        self.c = c

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] of latents [B, C, H, W]."""
        c = self.c if self.c is not None else 0.00054 * math.sqrt(pred[0].numel())
        sq = ((pred - target) ** 2).flatten(1).sum(dim=1)
        return torch.sqrt(sq + c * c) - c


class FrozenPerceptualLoss(nn.Module):
    """Wrap a perceptual network `net` as a frozen loss: eval mode always (batch-norm running stats, no
    head dropout), no parameter gradients; gradients still flow to `pred`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenPerceptualLoss:
        """Set this wrapper's mode; the wrapped network stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The network's per-sample distance [B]; differentiable in `pred`."""
        return self.net(pred, target)




def latent_lpips_options(weights: str) -> dict:
    """Loss kwargs for a LatentLPIPS given by name: "random" is an untrained trunk of width 0.25 (for
    latent spaces with no LatentLPIPS: random deep features still make a usable distance), anything
    else a PACKAGED_LPIPS name or a weights path."""
    if weights == "random":
        return {"allow_random": True, "width": 0.25}
    return {"weights": weights}


def _latent_lpips(ensemble: bool) -> Callable[..., nn.Module]:
    def build(weights: str | os.PathLike | None = None, allow_random: bool = False, **kwargs) -> nn.Module:
        from distill.lpips.checkpoints import from_official, load_lpips
        from distill.lpips.latent_lpips import ELatentLPIPS, LatentLPIPS

        if not ensemble:
            kwargs.pop("augment", None)
        if weights is not None:
            path = PACKAGED_LPIPS.get(str(weights), Path(weights))
            # Our own files are safetensors; an official tuned .pth needs from_official's key mapping.
            net = (
                load_lpips(path, ensemble, **kwargs)
                if path.suffix == ".safetensors"
                else from_official(path, ensemble, **kwargs)
            )
        elif allow_random:
            net = (ELatentLPIPS if ensemble else LatentLPIPS)(**kwargs)
            net.random_weights = True
        else:
            raise ValueError(
                f"{'e_latent_lpips' if ensemble else 'latent_lpips'} needs weights= (our .safetensors or an "
                "official *_latest_vgg16_tuned.pth); pass allow_random=True only for tests and cost benchmarks"
            )
        return FrozenPerceptualLoss(net)

    return build


def _pixel_lpips(
    vae=None,
    vgg_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    allow_random: bool = False,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    from distill.lpips.pixel import DecodedPixelLPIPS, PixelLPIPS, load_pixel_trunk_lpips

    if vae is None:
        raise ValueError("pixel_lpips needs vae= (an AutoencoderKL or a local path) to decode latents")
    if weights is not None:
        if vgg_weights is not None or lpips_weights is not None:
            raise ValueError("pixel_lpips: give either weights= (a calibrated pixel-trunk file) or "
                             "vgg_weights= and lpips_weights= (ImageNet VGG16 + LPIPS heads), not both")
        net = load_pixel_trunk_lpips(PACKAGED_PIXEL_LPIPS.get(str(weights), Path(weights)))
    else:
        net = PixelLPIPS(vgg_weights, lpips_weights, allow_random)
    return FrozenPerceptualLoss(DecodedPixelLPIPS(vae, net))


REGRESSION_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "mse": MSELoss,
    "pseudo_huber": PseudoHuberLoss,
    "latent_lpips": _latent_lpips(ensemble=False),
    "e_latent_lpips": _latent_lpips(ensemble=True),
    "pixel_lpips": _pixel_lpips,
}


def make_regression_loss(name: str, **kwargs) -> nn.Module:
    """Build a per-sample regression loss by name; see REGRESSION_LOSSES for the names.

    latent_lpips / e_latent_lpips: weights=<path or a PACKAGED_LPIPS name>, or allow_random=True; plus LatentLPIPS options
    (latent_channels, width, l1_weight, normalize, vae, and augment for the ensemble).
    pixel_lpips: vae=<AutoencoderKL or path> (the trainer passes the teacher's), and either
    vgg_weights= + lpips_weights= (ImageNet VGG16 and LPIPS heads; or allow_random=True), or
    weights=<a PACKAGED_PIXEL_LPIPS name ("shapes") or a calibrated pixel-trunk .safetensors>.
    pseudo_huber: c=<float> (default 0.00054*sqrt(C*H*W)).
    """
    if name not in REGRESSION_LOSSES:
        raise ValueError(
            f"unknown regression loss {name!r}; valid names: {', '.join(sorted(REGRESSION_LOSSES))}"
        )
    return REGRESSION_LOSSES[name](**kwargs)
