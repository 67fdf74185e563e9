"""Latent VGG16-BN trunk: torchvision's `vgg16_bn().features` index layout, re-typed for latents.

The layout is reproduced (not imported: torchvision is not a dependency) so that official keys
`features.N.*` map one to one onto `self.features[N]`. Two changes from the pixel network, as in
E-LatentLPIPS: the first convolution takes the latent channels, and the first three max-pools are
replaced by `nn.Identity` (latents are already 8x smaller than pixels). Replacing instead of
deleting keeps every later index where torchvision has it.
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's configuration "D" (VGG16); "M" is a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

# Index of the ReLU ending each of the five conv stages in vgg16_bn.features (relu1_2 .. relu5_3).
VGG16_BN_TAPS: tuple[int, ...] = (5, 12, 22, 32, 42)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
NUM_POOLS_REMOVED = 3


def scaled_channels(channels: int, width: float) -> int:
    """Channel count under a width multiplier; tests use width < 1, official weights need 1."""
    return max(1, int(round(channels * width)))


def build_vgg16_bn_features(
    in_channels: int, width: float = 1.0, pools_removed: int = NUM_POOLS_REMOVED
) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    pools_seen = 0
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.Identity() if pools_seen < pools_removed else nn.MaxPool2d(2, 2))
            pools_seen += 1
            continue
        out = scaled_channels(int(item), width)
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers)


def _init_like_torchvision(module: nn.Module) -> None:
    # Kaiming (fan_out) convolutions and identity batch norm: keeps activations of a random trunk
    # at a usable scale through 13 layers, which the random-weight tests and benchmarks rely on.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class LatentVGG16BN(nn.Module):
    """VGG16-BN feature extractor over latents, returning the five stage outputs.

    Args:
        latent_channels: channels of the latent (4 for SD1.5/2.x/SDXL, 16 for SD3/FLUX).
        width: channel multiplier; 1.0 is the official architecture (~14.7M parameters).
    """

    def __init__(self, latent_channels: int = 4, width: float = 1.0) -> None:
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.latent_channels = latent_channels
        self.width = width
        self.features = build_vgg16_bn_features(latent_channels, width)
        self.tap_channels = tuple(scaled_channels(c, width) for c in TAP_CHANNELS)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape [B, {self.latent_channels}, H, W], got {tuple(x.shape)}"
            )
        taps: list[torch.Tensor] = []
        last = VGG16_BN_TAPS[-1]
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_BN_TAPS:
                taps.append(x)
            if index == last:
                break  # the final max-pool feeds only the classifier, never a tap
        return taps


class LatentClassifier(nn.Module):
    """Trunk plus a light classification head, used only to pre-train the trunk on labelled latents.

    The head (global average pool + linear) is ours, not torchvision's 25088x4096 MLP: only the
    trunk is ever reused, and a small head keeps training cheap on latents of any size.
    """

    def __init__(self, latent_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        self.trunk = LatentVGG16BN(latent_channels, width)
        self.classifier = nn.Linear(self.trunk.tap_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk.features(x)
        return self.classifier(features.mean(dim=(2, 3)))
