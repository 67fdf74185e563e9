"""Latent datasets read from local folders (the pair store's `PairDataset` can feed these later).

Labelled latents (trunk training), ImageFolder-style:
    root/<class name>/<anything>.npy            one latent [C, H, W]
    root/<class name>/<anything>.safetensors    one latent [C, H, W] under the key "latent"
Class indices follow the sorted class-folder names.

2AFC triplets (head calibration), BAPPS's 2AFC split already encoded to diffusion latents:
    root/*.safetensors  each with "ref", "p0", "p1" [N, C, H, W] and "judge" [N] (or [N, 1]):
    the fraction of people who judged p1 closer to ref, in [0, 1] (BAPPS's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

LATENT_SUFFIXES = (".npy", ".safetensors")


def load_latent_file(path: Path) -> torch.Tensor:
    """One latent [C, H, W] as float32 from a .npy file or a safetensors file's "latent" tensor.

    Args:
        path: the file.
    """
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
    else:
        tensors = load_file(str(path))
        if "latent" not in tensors:
            raise ValueError(f"{path}: no 'latent' tensor (found {sorted(tensors)})")
        tensor = tensors["latent"].float()
    if tensor.ndim != 3:
        raise ValueError(f"{path}: expected one latent [C, H, W], got shape {tuple(tensor.shape)}")
    return tensor


class LabelledLatentFolder:
    """Index of (file, class) pairs; latents are read per batch, so the folder may exceed RAM.

    Args:
        root: folder of class sub-folders of latents (layout in the module doc).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"latent dataset folder not found: {self.root}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.items: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).iterdir() if p.suffix in LATENT_SUFFIXES)
            self.items += [(p, index) for p in files]
        if len(self.classes) < 2 or not self.items:
            raise ValueError(
                f"{self.root}: need at least two class folders holding {'/'.join(LATENT_SUFFIXES)} latents, "
                f"found {len(self.classes)} classes and {len(self.items)} files"
            )
        self.latent_shape = tuple(load_latent_file(self.items[0][0]).shape)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [N, C, H, W], labels [N]) of the items at `indices`."""
        latents, labels = [], []
        for i in indices.tolist():
            path, label = self.items[i]
            latent = load_latent_file(path)
            if tuple(latent.shape) != self.latent_shape:
                raise ValueError(
                    f"{path}: shape {tuple(latent.shape)} differs from the dataset's {self.latent_shape}"
                )
            latents.append(latent)
            labels.append(label)
        return torch.stack(latents), torch.tensor(labels, dtype=torch.long)


@dataclass
class Triplets:
    """2AFC triplets in memory.

    Args:
        ref: reference latents [N, C, H, W].
        p0, p1: the two distorted latents [N, C, H, W].
        judge: fraction of people judging p1 closer to ref [N], in [0, 1].
    """

    ref: torch.Tensor
    p0: torch.Tensor
    p1: torch.Tensor
    judge: torch.Tensor

    def __len__(self) -> int:
        return self.ref.shape[0]

    def batch(self, indices: torch.Tensor) -> Triplets:
        """The triplets at `indices`."""
        return Triplets(self.ref[indices], self.p0[indices], self.p1[indices], self.judge[indices])


def load_triplets(root: str | Path) -> Triplets:
    """All triplet shards of `root`, validated and concatenated in file-name order.

    Args:
        root: folder of *.safetensors triplet shards (layout in the module doc).
    """
    root = Path(root)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors triplet shards in {root}")
    parts: dict[str, list[torch.Tensor]] = {"ref": [], "p0": [], "p1": [], "judge": []}
    shape = None
    for path in files:
        tensors = load_file(str(path))
        missing = [k for k in parts if k not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing}")
        ref = tensors["ref"].float()
        n = ref.shape[0]
        for key in ("p0", "p1"):
            if tensors[key].shape != ref.shape:
                raise ValueError(
                    f"{path}: {key!r} shape {tuple(tensors[key].shape)} differs from 'ref' {tuple(ref.shape)}"
                )
        judge = tensors["judge"].float().reshape(-1)
        if judge.numel() != n:
            raise ValueError(f"{path}: 'judge' has {judge.numel()} values for {n} triplets")
        if bool(((judge < 0) | (judge > 1)).any()):
            raise ValueError(f"{path}: 'judge' values must lie in [0, 1]")
        if ref.ndim != 4 or (shape is not None and tuple(ref.shape[1:]) != shape):
            raise ValueError(
                f"{path}: 'ref' shape {tuple(ref.shape)} does not match the other shards' [N, *{shape}]"
            )
        shape = tuple(ref.shape[1:])
        parts["ref"].append(ref)
        parts["p0"].append(tensors["p0"].float())
        parts["p1"].append(tensors["p1"].float())
        parts["judge"].append(judge)
    return Triplets(*(torch.cat(parts[k]) for k in ("ref", "p0", "p1", "judge")))
