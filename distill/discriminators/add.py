"""ADD discriminator in its latent form (LADD): frozen teacher-UNet features, small trainable heads.

The frozen UNet is held outside the module tree (not a submodule), so `parameters()`,
`state_dict()`, optimisers and DDP see only the heads. Features are taken at re-noised inputs x_t
from several blocks; each head is conditioned on the noise level and a text summary vector
(the pooled embedding for SDXL-type teachers, the token mean for SD1.5; see Conditioning).
The UNet forward stops after the last tapped block, so encoder-only taps skip the decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.conditioning import Conditioning
from distill.discriminators.heads import ConditionedHead
from distill.discriminators.unet_probe import (
    StopForward,
    block_module,
    block_names,
    dummy_conditioning,
    probe_size,
    tap_block_outputs,
)


def default_feature_blocks(unet: nn.Module) -> list[str]:
    """Encoder blocks and the mid block: the teacher's most semantic features at the least cost."""
    names = block_names(unet)
    return [n for n in names if n.startswith("down") or n == "mid"]


class ADDDiscriminator(nn.Module):
    def __init__(self, teacher_unet: nn.Module, feature_blocks: list[str] | None = None, head_hidden: int = 64):
        super().__init__()
        self._frozen = [teacher_unet]  # a list: keeps the teacher out of parameters()/state_dict()
        teacher_unet.requires_grad_(False).eval()
        self.feature_blocks = list(feature_blocks) if feature_blocks else default_feature_blocks(teacher_unet)
        for name in self.feature_blocks:
            block_module(teacher_unet, name)  # raises a clear error for an unknown block name
        shapes, text_dim = self._probe(teacher_unet)
        self.heads = nn.ModuleDict(
            {name: ConditionedHead(shapes[name][0], text_dim, head_hidden) for name in self.feature_blocks}
        )

    @property
    def teacher_unet(self) -> nn.Module:
        return self._frozen[0]

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
        """Per-head logits [B, n_heads] (float32) from features `extract` returned."""
        dtype = next(self.heads.parameters()).dtype
        text = text.to(dtype)
        return torch.stack(
            [self.heads[name](f, timesteps, text) for name, f in zip(self.feature_blocks, features, strict=True)], dim=1
        )
