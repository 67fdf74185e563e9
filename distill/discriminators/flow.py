"""Discriminators for flow-matching transformer teachers (SD3- and FLUX-style): LADD and Diffusion2GAN
on image tokens.

Both read the image tokens a transformer block outputs (forward hooks on `transformer_blocks[i]`,
named "block{i}", and FLUX's `single_transformer_blocks[i]`, "single{i}"; every block returns
(text tokens, image tokens)), laid back onto their token grid [B, D, h/p, w/p] so the convolutional
heads of distill.discriminators.heads read them as feature maps. The forward stops after the last
tapped block.

- `FlowLADDDiscriminator` (`ladd`, `add` without score distillation): the frozen teacher judges the
  latent re-noised to sigma ~ LogitNormal(mean, std) (LADD as published for SD3-Turbo); conditioned
  heads (noise level and pooled text) on the chosen blocks' tokens; R1 on the heads' inputs.
- `FlowD2GDiscriminator` (`d2g`): a trainable copy of the teacher transformer evaluated at the
  d2g_timestep (sigma = d2g_timestep / 1000); the generator's input noise z enters the token stream
  through a zero-initialised patch embedding added to the patch-embedded tokens (SD3: a conv of the
  patch size; FLUX: a linear map of the packed 2x2 tokens); readout heads on the tokens of several
  blocks (`d2g_token_blocks`); single-sample R1 on the judged latent. The transformer has one token
  resolution, so the UNet discriminator's multi-scale input and head points do not apply.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import nn

from d2g.teacher.flow import FLUX
from distill.conditioning import Conditioning
from distill.discriminators.add import ADDDiscriminator
from distill.discriminators.base import JudgedInOneBatch, without_fused_attention
from distill.discriminators.heads import ConditionedHead, ReadoutHead
from distill.discriminators.unet_probe import StopForward
from distill.flow_student import FlowSchedule, flow_velocity
from distill.objective_config import ADDFamilyConfig, D2GConfig


def flow_block_names(transformer: nn.Module) -> list[str]:
    """Tap names in execution order: block0.. (transformer_blocks), then single0.. (FLUX's single-stream blocks)."""
    names = [f"block{i}" for i in range(len(transformer.transformer_blocks))]
    singles = getattr(transformer, "single_transformer_blocks", None) or []
    return names + [f"single{i}" for i in range(len(singles))]


def flow_block(transformer: nn.Module, name: str) -> nn.Module:
    """The block a tap name names; ValueError listing the valid names."""
    for prefix, attr in (("block", "transformer_blocks"), ("single", "single_transformer_blocks")):
        blocks = getattr(transformer, attr, None) or []
        if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) < len(blocks):
            return blocks[int(name[len(prefix):])]
    raise ValueError(f"unknown transformer block {name!r}; choose from {flow_block_names(transformer)}")


def token_grid(transformer: nn.Module, kind: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image-token grid of a latent of size `latent_hw`: h/p x w/p (FLUX: its 2x2 packing)."""
    p = 2 if kind == FLUX else int(transformer.config.patch_size)
    return latent_hw[0] // p, latent_hw[1] // p


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens [B, N, D] (row-major over the grid) -> a feature map [B, D, gh, gw]."""
    b, n, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def _width(transformer: nn.Module) -> int:
    c = transformer.config
    return int(c.num_attention_heads * c.attention_head_dim)


@contextlib.contextmanager
def tap_tokens(transformer: nn.Module, names: list[str], grid: tuple[int, int], store: dict, stop: bool = True):
    """Record each named block's image tokens as a map in `store`; stop the forward after the last."""
    order = flow_block_names(transformer)
    last = max(order.index(n) for n in names)
    handles = []

    def hook(name, module, args, output):
        if name in store:  # a gradient-checkpointed block recomputed in backward: keep the first, go on
            return
        store[name] = tokens_to_map(output[1], grid)
        if stop and order.index(name) == last:
            raise StopForward

    try:
        for name in names:
            handles.append(flow_block(transformer, name).register_forward_hook(functools.partial(hook, name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _check_blocks(transformer: nn.Module, names: list[str] | None) -> list[str]:
    # Default: every block (FLUX's single-stream ones too: the text half of the last double
    # block's output would otherwise leave its text-branch parameters without gradients).
    names = list(names) if names else flow_block_names(transformer)
    for name in names:
        flow_block(transformer, name)
    return names


class FlowLADDDiscriminator(ADDDiscriminator):
    """LADD on a frozen flow transformer (see the module docstring); the ADDDiscriminator entry
    points with sigmas for timesteps.

    Args:
        teacher_transformer: the teacher's transformer, frozen and shared (kept out of the module tree).
        kind: SD3 or FLUX.
        feature_blocks: tap names ("block0", "single1"...); None: every block.
        head_hidden: hidden width of the heads.
        schedule: the flow schedule (distill.flow_student.FlowSchedule) that re-noises judged latents.
        t_logit_mean, t_logit_std: re-noising sigma ~ LogitNormal(mean, std).
    """

    def __init__(self, teacher_transformer: nn.Module, kind: str, feature_blocks: list[str] | None = None,
                 head_hidden: int = 64, *, schedule: FlowSchedule | None = None, t_logit_mean: float = 1.0,
                 t_logit_std: float = 1.0):
        nn.Module.__init__(self)
        self._frozen = [teacher_transformer]
        self._schedule = [schedule]
        self.kind = kind
        self.t_logit_mean, self.t_logit_std = float(t_logit_mean), float(t_logit_std)
        teacher_transformer.requires_grad_(False).eval()
        self.feature_blocks = _check_blocks(teacher_transformer, feature_blocks)
        pooled = int(teacher_transformer.config.pooled_projection_dim)
        width = _width(teacher_transformer)
        self.heads = nn.ModuleDict({n: ConditionedHead(width, pooled, head_hidden) for n in self.feature_blocks})

    @classmethod
    def from_config(cls, teacher_transformer: nn.Module, schedule: FlowSchedule, config: ADDFamilyConfig, *,
                    kind: str, gradient_checkpointing: bool = False) -> FlowLADDDiscriminator:
        """The discriminator an `add`/`ladd` config describes (`gradient_checkpointing` does not
        apply: the backbone is frozen); ValueError naming add_feature_blocks for an unknown block."""
        try:
            return cls(teacher_transformer, kind, config.add_feature_blocks, config.head_hidden, schedule=schedule,
                       t_logit_mean=config.add_t_logit_mean, t_logit_std=config.add_t_logit_std)
        except ValueError as err:
            raise ValueError(f"add_feature_blocks: {err}") from err

    def _run(self, x_t: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> dict:
        transformer = self.teacher_unet
        store: dict = {}
        grid = token_grid(transformer, self.kind, tuple(x_t.shape[-2:]))
        with tap_tokens(transformer, self.feature_blocks, grid, store):
            try:
                flow_velocity(transformer, self.kind, x_t, sigmas, cond)
            except StopForward:
                pass
        return store

    def forward(self, features: list[torch.Tensor], sigmas: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-head logits [B, n_heads] (float32); heads see the noise level as sigma * 1000."""
        return super().forward(features, sigmas.float() * FlowSchedule.num_train_timesteps, text)

    def sample_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        """Re-noising sigmas ~ LogitNormal(mean, std) on (0, 1) (LADD)."""
        return torch.sigmoid(torch.randn(batch, device=device) * self.t_logit_std + self.t_logit_mean)


class FlowD2GDiscriminator(JudgedInOneBatch, nn.Module):
    """The Diffusion2GAN discriminator on a flow transformer (see the module docstring); implements
    distill.discriminators.base.Discriminator.

    Args:
        teacher_transformer: the teacher's transformer; copied (float32, trainable), not modified.
        kind: SD3 or FLUX.
        token_blocks: tap names whose image tokens readout heads read (None: every block).
        z_conditioning: add the generator's input noise z through a zero-initialised patch embedding.
        readout_heads: a head on every tapped block; False: one head on the last tapped block.
        timestep: the timestep (sigma * 1000) the transformer is evaluated at.
        head_hidden: hidden width of the readout heads.
        gradient_checkpointing: recompute the copy's activations in backward.
        r1_samples: how many real samples the single-sample R1 penalty uses.
    """

    def __init__(self, teacher_transformer: nn.Module, kind: str, *, token_blocks: list[str] | None = None,
                 z_conditioning: bool = True, readout_heads: bool = True, timestep: int = 0, head_hidden: int = 64,
                 gradient_checkpointing: bool = False, r1_samples: int = 1):
        super().__init__()
        self.kind = kind
        blocks = _check_blocks(teacher_transformer, token_blocks)
        order = flow_block_names(teacher_transformer)
        blocks.sort(key=order.index)
        self.tap_names = blocks if readout_heads else blocks[-1:]
        self.transformer = copy.deepcopy(teacher_transformer).float().train().requires_grad_(True)
        self._drop_after(order.index(blocks[-1]))
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.z_conditioning = z_conditioning
        self.timestep = int(timestep)
        self.r1_samples = int(r1_samples)
        width = _width(self.transformer)
        self.z_embed: nn.Module | None = None
        if z_conditioning:
            channels = int(self.transformer.config.in_channels)  # FLUX: already the packed 4C
            if kind == FLUX:
                self.z_embed = nn.Linear(channels, width)
            else:
                p = int(self.transformer.config.patch_size)
                self.z_embed = nn.Conv2d(channels, width, p, stride=p)
            nn.init.zeros_(self.z_embed.weight)
            nn.init.zeros_(self.z_embed.bias)
            embed = self.transformer.x_embedder if kind == FLUX else self.transformer.pos_embed
            embed.register_forward_hook(self._embed_hook)
        self.heads = nn.ModuleDict({n: ReadoutHead(width, head_hidden) for n in self.tap_names})
        self._ctx: dict | None = None

    def _drop_after(self, last: int) -> None:
        """Remove what runs after the last tapped block (nothing reads it, and parameters without
        gradients would only cost memory and trip DDP)."""
        t = self.transformer
        n_double = len(t.transformer_blocks)
        t.transformer_blocks = t.transformer_blocks[: min(last + 1, n_double)]
        if getattr(t, "single_transformer_blocks", None) is not None:
            t.single_transformer_blocks = t.single_transformer_blocks[: max(last + 1 - n_double, 0)]
        t.norm_out = None
        t.proj_out = None

    @classmethod
    def from_config(cls, teacher_transformer: nn.Module, schedule: FlowSchedule, config: D2GConfig, *, kind: str,
                    gradient_checkpointing: bool = False) -> FlowD2GDiscriminator:
        """The discriminator a `d2g` config describes; ValueError naming d2g_token_blocks for an unknown block."""
        try:
            return cls(teacher_transformer, kind, token_blocks=config.d2g_token_blocks,
                       z_conditioning=config.d2g_z_conditioning, readout_heads=config.d2g_readout_heads,
                       timestep=config.d2g_timestep, head_hidden=config.head_hidden,
                       gradient_checkpointing=gradient_checkpointing, r1_samples=config.r1_samples)
        except ValueError as err:
            raise ValueError(f"d2g_token_blocks: {err}") from err

    def _embed_hook(self, module, args, output):
        ctx = self._ctx
        if ctx is None or ctx.get("z") is None:
            return None
        z = ctx["z"].to(self.z_embed.weight.dtype)
        if self.kind == FLUX:
            from d2g.teacher.flow import pack_tokens

            return output + self.z_embed(pack_tokens(z)).to(output.dtype)
        return output + self.z_embed(z).flatten(2).transpose(1, 2).to(output.dtype)

    @contextlib.contextmanager
    def double_backward_safe(self):
        """For R1: fused attention kernels have no double backward; checkpointing is dropped for it."""
        with without_fused_attention(self.transformer):
            yield

    def forward(self, latent: torch.Tensor, cond: Conditioning, z: torch.Tensor | None = None) -> torch.Tensor:
        """Real/fake logits [B, n_heads] (float32) of `latent` [B, C, h, w] under `cond`; `z` the
        generator's input noise (required with z conditioning)."""
        if self.z_conditioning and z is None:
            raise ValueError("d2g discriminator has z conditioning on but no noise 'z' was given")
        sigma = torch.full((latent.shape[0],), self.timestep / FlowSchedule.num_train_timesteps, device=latent.device)
        store: dict = {}
        grid = token_grid(self.transformer, self.kind, tuple(latent.shape[-2:]))
        self._ctx = {"z": z}
        try:
            with tap_tokens(self.transformer, self.tap_names, grid, store):
                try:
                    flow_velocity(self.transformer, self.kind, latent, sigma, cond)
                except StopForward:
                    pass
        finally:
            self._ctx = None
        return torch.stack([self.heads[n](store[n]) for n in self.tap_names], dim=1)
