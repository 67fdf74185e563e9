"""ADD discriminator in its latent form (LADD): frozen teacher-UNet features, small trainable heads.

The frozen UNet is held outside the module tree (not a submodule), so `parameters()`,
`state_dict()`, optimisers and DDP see only the heads. Features are taken at re-noised inputs x_t
from several blocks; each head is conditioned on the noise level and a text summary vector
(the pooled embedding for SDXL-type teachers, the token mean for SD1.5; see Conditioning).
The UNet forward stops after the last tapped block, so encoder-only taps skip the decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distill.conditioning import Conditioning
from distill.discriminators.base import DiscriminatorLogits
from distill.discriminators.heads import ConditionedHead
from distill.discriminators.r1 import r1_penalty
from distill.discriminators.unet_probe import (
    StopForward,
    block_module,
    block_names,
    dummy_conditioning,
    probe_size,
    tap_block_outputs,
)
from distill.objective_config import ADDFamilyConfig


def default_feature_blocks(unet: nn.Module) -> list[str]:
    """Encoder blocks and the mid block: the teacher's most semantic features at the least cost."""
    names = block_names(unet)
    return [n for n in names if n.startswith("down") or n == "mid"]


class ADDDiscriminator(nn.Module):
    """The ADD/LADD discriminator (see the module docstring); implements
    distill.discriminators.base.Discriminator.

    Args:
        teacher_unet: the teacher's UNet2DConditionModel, frozen (eval, no gradients) and shared.
        feature_blocks: tap names ("down0", "mid", "up1"...) whose outputs the heads judge;
            None: every down block and the mid block.
        head_hidden: hidden width of the heads.
        schedule: the teacher's noise schedule (distill.generator.NoiseSchedule), to re-noise the
            judged latents; only `generator_logits` and `discriminator_logits` need it.
        t_logit_mean, t_logit_std: re-noising timesteps t ~ LogitNormal(mean, std) on [0, 1] (LADD).
    """

    def __init__(self, teacher_unet: nn.Module, feature_blocks: list[str] | None = None, head_hidden: int = 64, *,
                 schedule: nn.Module | None = None, t_logit_mean: float = 1.0, t_logit_std: float = 1.0):
        super().__init__()
        # Lists keep the frozen teacher and the schedule out of parameters(), buffers() and state_dict().
        self._frozen = [teacher_unet]
        self._schedule = [schedule]
        self.t_logit_mean, self.t_logit_std = float(t_logit_mean), float(t_logit_std)
        teacher_unet.requires_grad_(False).eval()
        self.feature_blocks = list(feature_blocks) if feature_blocks else default_feature_blocks(teacher_unet)
        for name in self.feature_blocks:
            block_module(teacher_unet, name)  # raises a clear error for an unknown block name
        shapes, text_dim = self._probe(teacher_unet)
        self.heads = nn.ModuleDict(
            {name: ConditionedHead(shapes[name][0], text_dim, head_hidden) for name in self.feature_blocks}
        )

    @classmethod
    def from_config(cls, teacher_unet: nn.Module, schedule: nn.Module, config: ADDFamilyConfig) -> ADDDiscriminator:
        """The discriminator an `add` or `ladd` objective's config describes; ValueError naming
        add_feature_blocks for an unknown block."""
        try:
            return cls(teacher_unet, config.add_feature_blocks, config.head_hidden, schedule=schedule,
                       t_logit_mean=config.add_t_logit_mean, t_logit_std=config.add_t_logit_std)
        except ValueError as err:
            raise ValueError(f"add_feature_blocks: {err}") from err

    @property
    def teacher_unet(self) -> nn.Module:
        """The frozen teacher UNet whose features the heads judge."""
        return self._frozen[0]

    @property
    def schedule(self) -> nn.Module:
        """The noise schedule that re-noises judged latents; ValueError if none was given."""
        if self._schedule[0] is None:
            raise ValueError("ADDDiscriminator was built without a noise schedule; pass schedule=")
        return self._schedule[0]

    @torch.no_grad()
    def _probe(self, unet: nn.Module) -> tuple[dict, int]:
        size = probe_size(unet)
        param = next(unet.parameters())
        cond = dummy_conditioning(unet)
        x = torch.zeros(1, unet.config.in_channels, size, size, device=param.device, dtype=param.dtype)
        feats = self._run(x, torch.zeros(1, dtype=torch.long, device=param.device), cond)
        return {k: tuple(v.shape[1:]) for k, v in feats.items()}, cond.summary_vector().shape[-1]

    def _run(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> dict:
        unet = self.teacher_unet
        dtype = next(unet.parameters()).dtype
        store: dict = {}
        with tap_block_outputs(unet, self.feature_blocks, store):
            try:
                unet(x_t.to(dtype), timesteps, **cond.to(dtype).unet_kwargs())
            except StopForward:
                pass
        return store

    def extract(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        """Frozen-teacher features at x_t (in the heads' dtype). Gradients flow to x_t, never to the teacher."""
        feats = self._run(x_t, timesteps, cond)
        dtype = next(self.heads.parameters()).dtype
        return [feats[name].to(dtype) for name in self.feature_blocks]

    def forward(self, features: list[torch.Tensor], timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-head logits [B, n_heads] (float32) from features `extract` returned at `timesteps`,
        each head conditioned on the timestep and the text summary vector `text` [B, D]."""
        dtype = next(self.heads.parameters()).dtype
        text = text.to(dtype)
        return torch.stack(
            [self.heads[name](f, timesteps, text) for name, f in zip(self.feature_blocks, features, strict=True)], dim=1
        )

    # -- the objective's entry points (distill.discriminators.base.Discriminator) ------------------
    def sample_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        """Re-noising timesteps: t ~ LogitNormal(mean, std) on [0, 1] mapped to discrete steps (LADD)."""
        u = torch.sigmoid(torch.randn(batch, device=device) * self.t_logit_std + self.t_logit_mean)
        return (u * (self.schedule.num_train_timesteps - 1)).round().long()

    def _renoised_features(self, x0: torch.Tensor, cond: Conditioning, timesteps: torch.Tensor) -> list[torch.Tensor]:
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), timesteps)
        return self.extract(x_t, timesteps, cond)

    def generator_logits(self, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n_heads] of the generator's latents, re-noised; gradients flow to `fake`
        through the frozen teacher. `z` is not used."""
        timesteps = self.sample_timesteps(fake.shape[0], fake.device)
        return self(self._renoised_features(fake, cond, timesteps), timesteps, cond.summary_vector())

    def discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning,
                             z: torch.Tensor | None = None, r1: bool = False,
                             forward: Callable | None = None) -> DiscriminatorLogits:
        """Real and fake re-noised to the same timesteps; teacher features without gradients
        (only the heads train), R1 on the heads' inputs (LADD). The heads run through `forward`
        (this module or a DDP wrapper of it). `z` is not used."""
        forward = self if forward is None else forward
        b = real.shape[0]
        timesteps = self.sample_timesteps(b, real.device)
        with torch.no_grad():
            real_feats = self._renoised_features(real, cond, timesteps)
            fake_feats = self._renoised_features(fake, cond, timesteps)
        if r1:
            # Leaves: the penalty's gradient stops at the features, never reaching the teacher.
            real_feats = [f.detach().requires_grad_(True) for f in real_feats]
        feats = [torch.cat([r, f]) for r, f in zip(real_feats, fake_feats, strict=True)]
        text = cond.summary_vector()
        logits = forward(feats, torch.cat([timesteps, timesteps]), torch.cat([text, text]))
        real_logits, fake_logits = logits[:b], logits[b:]
        penalty = r1_penalty(real_logits.mean(dim=1), real_feats) if r1 else None
        return DiscriminatorLogits(real_logits, fake_logits, penalty)
