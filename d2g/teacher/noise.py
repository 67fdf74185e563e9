"""Per-sample starting noise: a pure function of (dataset seed, sample index).

Drawn on the CPU with a generator of its own per sample, so the noise of sample j is the same
whatever the batch size, worker count, device or dtype of the run.
"""

from __future__ import annotations

import torch
import xxhash

NOISE_RULE = "xxh64(utf8(f'{seed}:{index}')) -> torch.Generator(cpu).manual_seed -> randn float32"


def sample_seed(dataset_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` (neighbouring samples get unrelated streams)."""
    return xxhash.xxh64_intdigest(f"{dataset_seed}:{index}".encode()) & 0x7FFF_FFFF_FFFF_FFFF


def sample_noise(dataset_seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of sample `index`: float32 `shape`, drawn on the CPU from its own seed."""
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(dataset_seed, index))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def batch_noise(dataset_seed: int, indices: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The noises of samples `indices`, stacked to [len(indices), *shape]; each equals `sample_noise`."""
    return torch.stack([sample_noise(dataset_seed, j, shape) for j in indices])
