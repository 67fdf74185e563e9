"""R1 gradient penalty: gamma/2 * E ||d D(x) / d x||^2 on real inputs."""

from __future__ import annotations

import torch


def r1_penalty(real_logits: torch.Tensor, inputs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Per-sample squared gradient norm of sum(real_logits) w.r.t. `inputs` (summed over inputs), [B].

    `create_graph=True` so the penalty itself trains the discriminator."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    grads = torch.autograd.grad(real_logits.float().sum(), inputs, create_graph=True)
    total = 0
    for g in grads:
        total = total + g.float().pow(2).flatten(1).sum(dim=1)
    return total
