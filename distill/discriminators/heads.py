"""Small trainable readout heads that turn a feature map into real/fake logits."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int, preferred: int = 32) -> int:
    return math.gcd(channels, preferred) or 1


class ReadoutHead(nn.Module):
    """Diffusion2GAN readout: conv3x3 -> GroupNorm -> SiLU -> conv1x1 to one logit per pixel, spatial mean.

    Args:
        channels: channels of the feature map read.
        hidden: hidden width (capped at max(channels, 8)).
    """

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        hidden = min(hidden, max(channels, 8))
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(hidden), hidden)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B] (float32) of a feature map [B, channels, h, w]."""
        h = F.silu(self.norm(self.conv(features)))
        return self.out(h).float().mean(dim=(1, 2, 3))


def timestep_features(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device).float() / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionedHead(nn.Module):
    """LADD head: conv features modulated (FiLM) by the noise level and the pooled text embedding.

    The projection term <phi(h), c> (projection discriminator) makes text alignment part of the
    logit, not only a feature modulation.

    Args:
        channels: channels of the feature map read.
        cond_dim: size of the text vector.
        hidden: hidden width (capped at max(channels, 8)).
        t_dim: size of the sinusoidal timestep embedding.
    """

    def __init__(self, channels: int, cond_dim: int, hidden: int = 64, t_dim: int = 64):
        super().__init__()
        hidden = min(hidden, max(channels, 8))
        self.t_dim = t_dim
        self.cond = nn.Sequential(nn.Linear(t_dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(hidden), hidden, affine=False)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits [B] (float32) of features [B, channels, h, w] at `timesteps` [B] for `text` [B, cond_dim]."""
        c = torch.cat([timestep_features(timesteps, self.t_dim).to(text.dtype), text], dim=-1)
        scale, shift, proj = self.cond(c).chunk(3, dim=-1)
        h = self.norm(self.conv(features))
        h = F.silu(h * (1 + scale[..., None, None]) + shift[..., None, None])
        logits = self.out(h) + (h * proj[..., None, None]).sum(dim=1, keepdim=True) / math.sqrt(h.shape[1])
        return logits.float().mean(dim=(1, 2, 3))
