"""Helpers to read a diffusers UNet2DConditionModel from outside: dummy inputs and named feature taps.

Both discriminators tap the UNet with forward hooks instead of re-implementing its forward, so
the same code follows SD1.5 and SDXL UNets (and diffusers' own changes to their forward)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from distill.conditioning import Conditioning, needs_pooled


class StopForward(Exception):
    """Raised by a hook once every requested feature is captured, to skip the rest of the UNet."""


def downsampling_factor(unet: nn.Module) -> int:
    """How much the UNet shrinks its input: latent sizes must be multiples of it."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def dummy_conditioning(unet: nn.Module, batch: int = 1) -> Conditioning:
    """Zero conditioning of the shapes the UNet's config declares (for probing feature shapes)."""
    param = next(unet.parameters())
    dim = unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    embeds = torch.zeros(batch, 2, dim, device=param.device, dtype=param.dtype)
    if not needs_pooled(unet):
        return Conditioning(embeds)
    n_ids = 6
    pooled_dim = unet.config.projection_class_embeddings_input_dim - n_ids * unet.config.addition_time_embed_dim
    pooled = torch.zeros(batch, pooled_dim, device=param.device, dtype=param.dtype)
    return Conditioning(embeds, pooled, torch.zeros(batch, n_ids, device=param.device, dtype=param.dtype))


def probe_size(unet: nn.Module) -> int:
    """Smallest convenient spatial size the UNet accepts."""
    return 2 * downsampling_factor(unet)


def block_names(unet: nn.Module) -> list[str]:
    """Tap names in execution order: down0.., mid, up0.."""
    names = [f"down{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid")
    names += [f"up{i}" for i in range(len(unet.up_blocks))]
    return names


def block_module(unet: nn.Module, name: str) -> nn.Module:
    """The block a tap name ("down0", "mid", "up1"...) names; ValueError listing the valid names."""
    if name == "mid":
        return unet.mid_block
    for prefix, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            index = int(name[len(prefix):])
            if index < len(blocks):
                return blocks[index]
    raise ValueError(f"unknown UNet block {name!r}; choose from {block_names(unet)}")


@contextlib.contextmanager
def tap_block_outputs(unet: nn.Module, names: list[str], store: dict, stop_after_last: bool = True):
    """Record each named block's output feature map in `store`; optionally stop after the last one."""
    order = block_names(unet)
    last = max(order.index(n) for n in names) if names else -1
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            store[name] = output[0] if isinstance(output, tuple) else output
            if stop_after_last and order.index(name) == last:
                raise StopForward

        return hook

    try:
        for name in names:
            handles.append(block_module(unet, name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
