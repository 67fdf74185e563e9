"""Pixel LPIPS (VGG16) behind a VAE decode: the expensive baseline E-LatentLPIPS replaces.

Real weights come only from the user's local files: a torchvision-layout VGG16 state dict
(`features.N.*`) and LPIPS head weights (`linK.model.1.weight`), both read with
`torch.load(weights_only=True)`. Random weights are allowed only when asked for explicitly
(`allow_random=True`, for cost benchmarks) and are flagged by `random_weights` and a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from d2g.teacher.vae import decode as vae_decode

from .checkpoints import CheckpointError, _assign, _torch_load
from .latent_lpips import LinearHead, paired_taps

# torchvision vgg16 (no batch norm) features: conv/relu pairs with pools at 4, 9, 16, 23, 30.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
PIXEL_TAPS = (3, 8, 15, 22, 29)
PIXEL_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's published input normalisation for [-1, 1] images (ImageNet statistics, rescaled).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def lpips_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Pixel LPIPS's channel normalisation, x / (||x|| + 1e-10) (the latent metric uses 1e-8 under
    the square root instead: `latent_lpips.unit_normalize`).

    Args:
        features: [B, C, H, W].
        eps: added to the norm.
    """
    return features / (torch.sqrt(torch.sum(features * features, dim=1, keepdim=True)) + eps)


def build_vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` layout (no batch norm), 3 input channels."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(*layers)


class PixelLPIPS(nn.Module):
    """VGG16 LPIPS on [-1, 1] RGB images; returns the per-sample distance [B].

    Args:
        vgg_weights: local torchvision-layout VGG16 state dict (`features.N.*`).
        lpips_weights: local LPIPS head weights (`linK.model.1.weight`).
        allow_random: permit random weights for whichever file is not given (cost benchmarks
            only; flagged by `random_weights` and a warning).
    """

    def __init__(
        self,
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
        allow_random: bool = False,
    ) -> None:
        super().__init__()
        self.features = build_vgg16_features()
        self.lins = nn.ModuleList(LinearHead(c) for c in PIXEL_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        missing = [
            name for name, p in (("vgg_weights", vgg_weights), ("lpips_weights", lpips_weights)) if p is None
        ]
        if missing and not allow_random:
            raise ValueError(
                f"pixel LPIPS needs local weight files ({', '.join(missing)} not given); "
                "pass allow_random=True only for cost benchmarks"
            )
        self.random_weights = bool(missing)
        if missing:
            warnings.warn(
                f"PixelLPIPS uses RANDOM weights for {missing}: distances are meaningless", stacklevel=2
            )
        if vgg_weights is not None:
            self._load_vgg(Path(vgg_weights))
        if lpips_weights is not None:
            self._load_heads(Path(lpips_weights))

    def _load_vgg(self, path: Path) -> None:
        obj = _torch_load(path)
        state = obj.get("state_dict", obj)
        feats = {k.split("features.", 1)[1]: v for k, v in state.items() if "features." in k}
        if not feats:
            raise CheckpointError(f"{path}: no 'features.N.*' keys (expected a torchvision vgg16 state dict)")
        _assign(self.features, feats, {k: f"features.{k}" for k in self.features.state_dict()}, path)

    def _load_heads(self, path: Path) -> None:
        state = _torch_load(path)
        mapped = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.startswith("lin") and key.endswith("model.1.weight") and key[3].isdigit():
                mapped[f"{key[3]}.model.1.weight"] = value
        _assign(self.lins, mapped, {k: f"lin{k[0]}.model.1.weight" for k in self.lins.state_dict()}, path)

    def taps(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The five VGG16 taps (relu1_2 .. relu5_3) of images in [-1, 1]."""
        x = (img - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in PIXEL_TAPS:
                out.append(x)
                if index == PIXEL_TAPS[-1]:
                    break
        return out

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B] between two image batches in [-1, 1]."""
        total = img0.new_zeros(img0.shape[0])
        pairs = paired_taps(self.taps, img0, img1, separable=True)  # no batch norm in VGG16
        for (f0, f1), head in zip(pairs, self.lins, strict=True):
            diff = lpips_normalize(f0) - lpips_normalize(f1)
            total = total + head(diff * diff).mean(dim=(1, 2, 3))
        return total


def load_pixel_trunk_lpips(path: str | os.PathLike) -> nn.Module:
    """A pixel LPIPS with a VGG16-BN trunk of our own (`distill lpips train-trunk --pools-removed 0`,
    then `calibrate`; the packaged shapes one), in eval mode: images [B, 3, H, W] in [-1, 1] -> [B].

    Args:
        path: our calibrated `.safetensors`; refused by name if its trunk is a latent one.
    """
    from .checkpoints import load_lpips

    model = load_lpips(path, ensemble=False, l1_weight=0.0)
    if model.latent_channels != 3 or model.pools_removed != 0:
        raise CheckpointError(
            f"{path}: a latent LPIPS ({model.latent_channels} channels, {model.pools_removed} max-pools removed), "
            "not a pixel one (3 channels, none removed); use it with latent_lpips / e_latent_lpips"
        )
    return model


def load_vae(vae) -> nn.Module:
    """An AutoencoderKL: `vae` itself if a module, else loaded from a local VAE folder or a
    pipeline folder holding `vae/`.

    Args:
        vae: an AutoencoderKL instance or a local path.
    """
    if isinstance(vae, nn.Module):
        return vae
    from diffusers import AutoencoderKL

    path = Path(vae)
    if (path / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path)
    raise FileNotFoundError(f"no AutoencoderKL at {path} (looked for config.json and vae/config.json)")


class DecodedPixelLPIPS(nn.Module):
    """Decode diffusion latents with a frozen VAE, then pixel LPIPS: the baseline loss.

    Decoding is `d2g.teacher.vae.decode` (the VAE's own shift and scale, images clamped to [-1, 1]).

    Args:
        vae: an AutoencoderKL or a local path (see `load_vae`).
        pixel_lpips: the pixel metric applied to the decoded images (`PixelLPIPS`, or the pixel-trunk
            LPIPS of `load_pixel_trunk_lpips`).
    """

    def __init__(self, vae, pixel_lpips: nn.Module) -> None:
        super().__init__()
        self.vae = load_vae(vae).eval().requires_grad_(False)
        self.lpips = pixel_lpips.eval().requires_grad_(False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1] (differentiable)."""
        return vae_decode(self.vae, latents)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample pixel LPIPS [B] between the decodes of two latent batches."""
        return self.lpips(self.decode(pred), self.decode(target))
