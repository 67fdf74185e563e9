"""What an objective needs from a discriminator, whatever its kind.

An objective builds its discriminator with `from_config` and then only calls `generator_logits`
(the generator step) and `discriminator_logits` (the discriminator step). How each kind turns
latents into logits (a trainable UNet judging the latent itself, or heads on frozen teacher
features of a re-noised latent) and where it takes R1 stay inside the discriminator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill.conditioning import Conditioning
from distill.discriminators.r1 import r1_penalty
from distill.objective_config import AdversarialConfig


class DiscriminatorLogits(NamedTuple):
    """One discriminator step's outputs: logits [B, n_heads] (float32) of the real and the fake
    latents, and the per-sample R1 penalty [n] (the squared gradient norm of the real logits with
    respect to the discriminator's input) when it was asked for, else None."""

    real: torch.Tensor
    fake: torch.Tensor
    r1: torch.Tensor | None


class Discriminator(Protocol):
    """The discriminator interface of distill.objectives (D2GDiscriminator, ADDDiscriminator)."""

    @classmethod
    def from_config(cls, teacher_unet: nn.Module, schedule: nn.Module, config: AdversarialConfig) -> Discriminator:
        """Build from the teacher UNet, its noise schedule (distill.generator.NoiseSchedule) and
        the objective's config. Raises ValueError naming the bad option."""
        ...

    def generator_logits(self, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_heads] of the generator's latents `fake` for the generator step; gradients
        flow to `fake`. `z` is the generator's input for those latents."""
        ...

    def discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor,
                             r1: bool = False, forward: Callable | None = None) -> DiscriminatorLogits:
        """Logits of real and fake latents (same conditioning and generator input `z`) for the
        discriminator step, and the R1 penalty if `r1`. Trainable computation runs through
        `forward` (default: the discriminator itself; pass a DDP wrapper of it so the wrapper
        sees the call)."""
        ...


@contextlib.contextmanager
def without_fused_attention(model: nn.Module) -> Iterator[None]:
    """For R1 through a trainable diffusers model: fused attention kernels have no double backward,
    and a checkpointed block would be recomputed outside this context with another kernel; R1 runs
    on few samples, so dropping checkpointing for it costs little memory."""
    checkpointing = model.is_gradient_checkpointing
    if checkpointing:
        model.disable_gradient_checkpointing()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if checkpointing:
            model.enable_gradient_checkpointing()


class JudgedInOneBatch:
    """`generator_logits` / `discriminator_logits` of a discriminator that judges a latent directly
    (d2g's trainable copies): real and fake in one call, R1 on the first `r1_samples` reals. The
    class provides `__call__(latent, cond, z=...)`, `r1_samples` and `double_backward_safe()`."""

    r1_samples: int

    def generator_logits(self, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_heads] of the generator's latents; gradients flow to `fake`."""
        return self(fake, cond, z=z)

    def discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor,
                             r1: bool = False, forward: Callable | None = None) -> DiscriminatorLogits:
        """Real and fake judged in one batch; R1 on `r1_samples` real latents (the paper's
        single-sample R1), through `forward` (this module or a DDP wrapper of it)."""
        forward = self if forward is None else forward
        b = real.shape[0]
        logits = forward(torch.cat([real, fake]), cond.cat(cond), z=torch.cat([z, z]))
        penalty = None
        if r1:
            n = min(self.r1_samples, b)
            x = real[:n].detach().requires_grad_(True)
            with self.double_backward_safe():
                r1_logits = forward(x, cond.select(slice(0, n)), z=z[:n])
                penalty = r1_penalty(r1_logits.mean(dim=1), x)
        return DiscriminatorLogits(logits[:b], logits[b:], penalty)
