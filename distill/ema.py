"""Exponential moving average of the generator's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose weights track the model's as an exponential moving average.

    Args:
        model: the model to follow; copied (eval mode, no gradients).
        decay: weight of the old average at each update, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s parameters by (1 - decay); copy its buffers."""
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        """The averaged model's state dict."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged model from `state_dict()`'s output."""
        self.model.load_state_dict(state)
