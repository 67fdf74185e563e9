"""Latent VGG16-BN trunk: torchvision's `vgg16_bn().features` index layout, re-typed for latents.

The layout is reproduced (not imported: torchvision is not a dependency) so that official keys
`features.N.*` map one to one onto `self.features[N]`. Two changes from the pixel network, as in
E-LatentLPIPS: the first convolution takes the latent channels, and the first three max-pools
(features indices 6, 13 and 23) are replaced by `nn.Identity` (latents are already 8x smaller than
pixels). Replacing instead of deleting keeps every later index where torchvision has it.

The five LPIPS taps are the outputs of the five slices `features[0:7]`, `[7:14]`, `[14:24]`,
`[24:34]`, `[34:44]`, i.e. read after the layer ending each slice. Those layers are the five
max-pools: the first three are identities here, so taps 1-3 equal relu1_2, relu2_2 and relu3_3;
taps 4 and 5 are read *after* the 4th and 5th (real) max-pools. For a 64x64 latent the tap sizes
are 64, 64, 64, 32, 16.
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's configuration "D" (VGG16); "M" is a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

# The LPIPS slices of vgg16_bn.features as [start, end) index ranges, and the index of the last
# layer of each (the five max-pools, 6/13/23/33/43): a tap is the output of that layer.
VGG16_BN_SLICES: tuple[tuple[int, int], ...] = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))
VGG16_BN_TAPS: tuple[int, ...] = tuple(end - 1 for _, end in VGG16_BN_SLICES)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
NUM_POOLS_REMOVED = 3  # latents; a pixel trunk (pools_removed=0) keeps all five


def min_input_size(pools_removed: int = NUM_POOLS_REMOVED) -> int:
    """Smallest input side: the max-pools kept all precede the 5th tap, which must keep one position.

    Args:
        pools_removed: how many of the first max-pools are identities (3 for latents, 0 for pixels).
    """
    return 2 ** (len(VGG16_BN_SLICES) - pools_removed)


MIN_LATENT_SIZE = min_input_size()


def scaled_channels(channels: int, width: float) -> int:
    """Channel count under a width multiplier; tests use width < 1, official weights need 1.

    Args:
        channels: the channel count at width 1.
        width: the multiplier (> 0).
    """
    return max(1, int(round(channels * width)))


def build_vgg16_bn_features(
    in_channels: int, width: float = 1.0, pools_removed: int = NUM_POOLS_REMOVED
) -> nn.Sequential:
    """torchvision's `vgg16_bn().features` layout (conv3x3-BN-ReLU blocks, 44 modules).

    Args:
        in_channels: channels of the input (latent channels here, 3 for pixels).
        width: channel multiplier applied to every convolution.
        pools_removed: how many of the first max-pools become `nn.Identity` (indices kept).
    """
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


def slice_of(index: int) -> int:
    """The LPIPS slice (1..5) holding vgg16_bn features index `index`; ValueError past the last.

    Args:
        index: an index into `vgg16_bn().features` (0..43).
    """
    for k, (start, end) in enumerate(VGG16_BN_SLICES, start=1):
        if start <= index < end:
            return k
    raise ValueError(f"features index {index} lies outside the LPIPS slices [0, {VGG16_BN_SLICES[-1][1]})")


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
    """VGG16-BN feature extractor over latents, returning the five LPIPS taps.

    Args:
        latent_channels: channels of the latent (4 for SD1.5/2.x/SDXL, 16 for SD3/FLUX; 3 for a
            pixel trunk).
        width: channel multiplier; 1.0 is the official architecture (~14.7M parameters).
        pools_removed: how many of the first max-pools are identities: 3 for latents (published),
            0 for a pixel trunk (the plain VGG16-BN layout, a pixel LPIPS's trunk).
    Call with latents [B, latent_channels, H, W] (H, W >= 4); returns five tensors of sizes
    (H, W), (H, W), (H, W), (H/2, W/2), (H/4, W/4) (floored) with `tap_channels` channels
    (with pools_removed=0: H/2 .. H/32, inputs at least 32x32).
    """

    def __init__(self, latent_channels: int = 4, width: float = 1.0, pools_removed: int = NUM_POOLS_REMOVED) -> None:
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0 <= pools_removed <= NUM_POOLS_REMOVED:
            raise ValueError(f"pools_removed must be in 0..{NUM_POOLS_REMOVED}, got {pools_removed}")
        self.latent_channels = latent_channels
        self.width = width
        self.pools_removed = pools_removed
        self.min_size = min_input_size(pools_removed)
        self.features = build_vgg16_bn_features(latent_channels, width, pools_removed)
        self.tap_channels = tuple(scaled_channels(c, width) for c in TAP_CHANNELS)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tap outputs for latents `x` [B, C, H, W]."""
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape [B, {self.latent_channels}, H, W], got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"inputs must be at least {self.min_size}x{self.min_size} ({5 - self.pools_removed} 2x2 "
                f"max-pools precede the last tap), got {tuple(x.shape[-2:])}"
            )
        taps: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_BN_TAPS:
                taps.append(x)
        return taps


class LatentClassifier(nn.Module):
    """Trunk plus a light classification head, used only to pre-train the trunk on labelled latents.

    The head (global average pool + linear) is ours, not torchvision's 25088x4096 MLP: only the
    trunk is ever reused, and a small head keeps training cheap on latents of any size.

    Args:
        latent_channels: channels of the latents to classify.
        num_classes: number of classes (logits returned per sample).
        width: trunk channel multiplier.
        pools_removed: see `LatentVGG16BN` (0 for a pixel trunk).
    """

    def __init__(
        self, latent_channels: int, num_classes: int, width: float = 1.0, pools_removed: int = NUM_POOLS_REMOVED
    ) -> None:
        super().__init__()
        self.trunk = LatentVGG16BN(latent_channels, width, pools_removed)
        self.classifier = nn.Linear(self.trunk.tap_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] for latents `x` [B, C, H, W]."""
        features = self.trunk.features(x)
        return self.classifier(features.mean(dim=(2, 3)))
