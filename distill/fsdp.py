"""Fully sharded training (`distill train --fsdp`): the trainable generator and discriminator (and
the generator's EMA) are sharded over the ranks with torch's FSDP2 (`fully_shard`), so each rank
holds 1/N of their parameters, gradients and AdamW states between the steps; a block's parameters
are all-gathered only while it runs, and its gradients reduce-scattered (averaged) in backward.

It runs on gloo (CPU) as on NCCL (GPUs): the mesh is built on the process group's device type.

Checkpoints keep the unsharded format of a DDP or single-rank run (`full_state_dict`, every rank
taking part in the gathers, rank 0 keeping the result), and a full checkpoint is loaded into
sharded modules and optimisers by each rank cutting its own shard (`shard_state_dict`,
`shard_optimizer_state`): so resume, export and an elastic restart on another number of ranks, with
or without FSDP, read the same files.

A discriminator trained with R1 (a backward through its input gradient) keeps each block's
gathered weights from that block's backward until the step's last backward (`shard`'s
double_backward): its whole weights are then held once per rank at the end of backward, while
its gradients and optimiser states stay sharded.

Frozen parameters (the frozen teacher, a discriminator's frozen feature network) are not sharded:
they have no gradients or optimiser states, and sharding their weights would add an all-gather of
them to every call; they stay whole on every rank, as without FSDP.
"""

from __future__ import annotations

import torch
from torch import nn

# The repeated blocks of the diffusers denoisers (UNet: down/mid/up blocks; SD3 / FLUX transformers:
# the (single) transformer blocks): each becomes one FSDP unit, so only one block's full weights are
# gathered at a time (besides the root's own layers: conv_in, embeddings, readout heads).
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
BLOCKS = ("mid_block",)


def _block_units(module: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of `module` (a block inside another one is not a unit of its own)."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if any(name.startswith(outer + ".") for outer, _ in units):
            continue
        if leaf in BLOCK_LISTS and isinstance(child, nn.ModuleList):
            units += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        elif leaf in BLOCKS and child is not None:
            units.append((name, child))
    return [block for _, block in units]


def device_mesh(world_size: int):
    """The 1-D mesh of all ranks on the default process group's device type (cpu for gloo)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = "cpu" if dist.get_backend() == "gloo" else torch.accelerator.current_accelerator().type
    return init_device_mesh(device, (world_size,))


def shard(module: nn.Module, mesh, like: nn.Module | None = None, double_backward: bool = False) -> nn.Module:
    """Shard `module`'s trainable parameters over `mesh` in place: each repeated block (BLOCK_LISTS,
    BLOCKS) with trainable parameters is one FSDP unit, the rest of the module the root unit.
    Parameters that do not require gradients now are left whole on every rank; with `like` (a
    copy's original, e.g. the generator of its EMA copy, whose parameters all are frozen), those
    whose namesakes in `like` do not.

    `double_backward`: the module's loss differentiates through a gradient of it (R1: autograd.grad
    with create_graph, then backward). FSDP's resharding after that inner backward would free the
    gathered weights the outer backward still needs ("setStorage: ... out of bounds for storage of
    size 0"), so the module keeps them after backward until `reshard` (which the caller must call
    after the last backward of each step, before the optimiser step). Returns `module`."""
    from torch.distributed.fsdp import fully_shard

    flags = {name: p.requires_grad for name, p in (like or module).named_parameters()}
    frozen = {p for name, p in module.named_parameters() if not flags[name]}
    for block in _block_units(module):
        if any(p not in frozen for p in block.parameters()):
            fully_shard(block, mesh=mesh, ignored_params=frozen)
    fully_shard(module, mesh=mesh, ignored_params=frozen)
    # As the DDP-style sync does: a trainable parameter that got no gradient on this rank is reduced
    # as zeros, so every rank issues the same collectives and AdamW sees the same (zero) gradient.
    module.set_reduce_scatter_unused_params(True)
    if double_backward:
        module.set_reshard_after_backward(False)
    return module


def reshard(module: nn.Module | None) -> None:
    """Free the gathered weights of every FSDP unit in `module` (a no-op for units already sharded,
    and for a module that is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules() if module is not None else ():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def _full(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(state: dict, keep: bool) -> dict | None:
    """`state` (a module's state dict) with every sharded tensor gathered whole, on the CPU; every
    rank must call it (each gather is a collective), in the same order. Returns the whole state
    where `keep` (rank 0), else None (the gathered tensors are dropped one at a time)."""
    out = {}
    for name, value in state.items():
        value = _full(value)
        if keep:
            out[name] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out if keep else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """The optimiser's state dict in the unsharded format (`Optimizer.state_dict()` of a run without
    FSDP: parameter indices, whole moment tensors); collective, like full_state_dict."""
    state = optimizer.state_dict()
    whole = {index: full_state_dict(state["state"][index], keep) for index in sorted(state["state"])}
    return {"state": whole, "param_groups": state["param_groups"]} if keep else None


def _shard_like(value, like):
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or not isinstance(value, torch.Tensor):
        return value
    # Every rank read the same checkpoint: each cuts its own shard, no communication (src_data_rank None).
    value = value.to(device=like.device_mesh.device_type, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def shard_state_dict(full: dict, module: nn.Module) -> dict:
    """A whole state dict (a checkpoint's) cut to `module`'s sharding, for `module.load_state_dict`."""
    current = module.state_dict()
    return {name: _shard_like(value, current.get(name)) for name, value in full.items()}


def shard_optimizer_state(full: dict, params: list[nn.Parameter]) -> dict:
    """A whole optimiser state dict (full_optimizer_state's format) cut to the sharding of `params`
    (the optimiser's parameters, in its order), for `Optimizer.load_state_dict`."""
    state = {int(index): {k: v if k == "step" else _shard_like(v, params[int(index)]) for k, v in entry.items()}
             for index, entry in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


def local_numel(params: list[nn.Parameter]) -> int:
    """How many elements of `params` this rank stores (its shards only, for sharded parameters)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
