"""Load official E-LatentLPIPS checkpoints from local files; save and load our own safetensors.

Official layouts (read with `torch.load(weights_only=True)` only: never unpickle objects):
  * trunk   `{enc}_latent_vgg16.pth.tar`: {"state_dict": {"model.features.N.*", ...}, "best_acc1": x}
    with keys possibly prefixed `module.` (DataParallel); classifier keys are ignored.
  * tuned   `{enc}_latest_vgg16_tuned.pth`: {"net.sliceK.N.*" (N = vgg16_bn features index,
    batch-norm running statistics included), "linK.model.1.weight", duplicated as
    "lins.K.model.1.weight"}.
Ours: one safetensors file with our module's own keys and a small metadata header.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .latent_lpips import ELatentLPIPS, LatentLPIPS
from .trunk import VGG16_BN_TAPS, LatentVGG16BN

FORMAT_LPIPS = "d2g-latent-lpips/1"
FORMAT_TRUNK = "d2g-latent-vgg16bn-trunk/1"
# Buffers a checkpoint may legitimately lack (older torch did not save them).
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the file and the key."""


def _torch_load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _strip_wrappers(key: str) -> str:
    # DataParallel adds `module.` and the official training wrapped torchvision under `model.`.
    parts = [p for p in key.split(".") if p != "module"]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts)


def _assign(target: nn.Module, mapped: dict[str, torch.Tensor], sources: dict[str, str], path: Path) -> None:
    """Copy `mapped` into `target`, naming the checkpoint key on any missing key or shape mismatch."""
    own = target.state_dict()
    for name, tensor in own.items():
        if name not in mapped:
            if name.endswith(OPTIONAL_SUFFIXES):
                continue
            raise CheckpointError(f"{path}: missing key {sources.get(name, name)!r} (for {name!r})")
        value = mapped[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: key {sources.get(name, name)!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(tensor.shape)} for {name!r}"
            )
    with torch.no_grad():
        for name, tensor in own.items():
            if name in mapped:
                tensor.copy_(mapped[name].to(tensor.dtype))


def official_trunk_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`features.N.*` tensors of an official trunk file, wrappers stripped."""
    obj = _torch_load(path)
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict")
    features = {}
    for key, value in state.items():
        stripped = _strip_wrappers(key)
        if stripped.startswith("features.") and isinstance(value, torch.Tensor):
            features[stripped] = value
    if not features:
        raise CheckpointError(f"{path}: no 'model.features.N.*' keys found (is this a vgg16_bn trunk file?)")
    return features


def load_official_trunk(path: str | os.PathLike, trunk: LatentVGG16BN) -> LatentVGG16BN:
    """Load an official `{enc}_latent_vgg16.pth.tar` into `trunk` in place."""
    features = official_trunk_state(path)
    mapped = {k: v for k, v in features.items()}
    sources = {k: f"model.{k}" for k in trunk.state_dict()}
    _assign(trunk, mapped, sources, Path(path))
    return trunk


def _slice_of(index: int) -> int:
    """LPIPS slice (1..5) holding vgg16_bn features index `index`."""
    for k, end in enumerate(VGG16_BN_TAPS, start=1):
        if index <= end:
            return k
    raise CheckpointError(f"features index {index} lies past the last tap ({VGG16_BN_TAPS[-1]})")


_SLICE_KEY = re.compile(r"^net\.slice(\d)\.(\d+)\.(.+)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.1\.weight$")
_LINS_KEY = re.compile(r"^lins\.(\d)\.model\.1\.weight$")


def official_tuned_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map an official tuned file onto our LatentLPIPS keys; returns (tensors, our key -> their key)."""
    path = Path(path)
    obj = _torch_load(path)
    state = obj.get("state_dict", obj)
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    lins_fallback: dict[str, tuple[str, torch.Tensor]] = {}
    for raw_key, value in state.items():
        key = ".".join(p for p in raw_key.split(".") if p != "module")
        if m := _SLICE_KEY.match(key):
            slice_no, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if _slice_of(index) != slice_no:
                raise CheckpointError(
                    f"{path}: key {raw_key!r} puts features index {index} in slice{slice_no}, expected slice{_slice_of(index)}"
                )
            ours = f"trunk.features.{index}.{rest}"
        elif m := _LIN_KEY.match(key):
            ours = f"lins.{m.group(1)}.model.1.weight"
        elif m := _LINS_KEY.match(key):
            lins_fallback[f"lins.{m.group(1)}.model.1.weight"] = (raw_key, value)
            continue
        else:
            continue  # e.g. scaling-layer buffers: not part of the latent model
        mapped[ours] = value
        sources[ours] = raw_key
    for ours, (raw_key, value) in lins_fallback.items():
        if ours not in mapped:
            mapped[ours], sources[ours] = value, raw_key
        elif not torch.equal(mapped[ours], value):
            raise CheckpointError(f"{path}: {raw_key!r} disagrees with its duplicate {sources[ours]!r}")
    return mapped, sources


def _expected_sources(model: LatentLPIPS) -> dict[str, str]:
    sources = {}
    for name in model.state_dict():
        if name.startswith("trunk.features."):
            index = int(name.split(".")[2])
            rest = ".".join(name.split(".")[3:])
            sources[name] = f"net.slice{_slice_of(index)}.{index}.{rest}"
        elif name.startswith("lins."):
            sources[name] = f"lin{name.split('.')[1]}.model.1.weight"
    return sources


def load_official_tuned(path: str | os.PathLike, model: LatentLPIPS) -> LatentLPIPS:
    """Load an official `{enc}_latest_vgg16_tuned.pth` (trunk + heads) into `model` in place."""
    mapped, sources = official_tuned_state(path)
    expected = _expected_sources(model)
    _assign(model, mapped, {**expected, **sources}, Path(path))
    return model


def infer_latent_channels(path: str | os.PathLike) -> int:
    """Latent channels of an official tuned or trunk file (from the first conv's weight)."""
    mapped, _ = official_tuned_state(path)
    weight = mapped.get("trunk.features.0.weight")
    if weight is None:
        weight = official_trunk_state(path).get("features.0.weight")
    if weight is None:
        raise CheckpointError(f"{path}: no first-convolution weight found")
    return int(weight.shape[1])


def from_official(path: str | os.PathLike, ensemble: bool = True, **kwargs) -> LatentLPIPS:
    """Build (E-)LatentLPIPS at the official width from a tuned file; channels inferred from it."""
    kwargs.setdefault("latent_channels", infer_latent_channels(path))
    model = (ELatentLPIPS if ensemble else LatentLPIPS)(**kwargs)
    return load_official_tuned(path, model).eval()


# --- our own safetensors files -------------------------------------------------------------------


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_lpips(model: LatentLPIPS, path: str | os.PathLike) -> None:
    """Trunk + heads + construction metadata, written atomically."""
    metadata = {
        "format": FORMAT_LPIPS,
        "latent_channels": str(model.latent_channels),
        "width": repr(model.width),
    }
    _atomic_save_file(model.state_dict(), Path(path), metadata)


def save_trunk(trunk: LatentVGG16BN, path: str | os.PathLike) -> None:
    metadata = {
        "format": FORMAT_TRUNK,
        "latent_channels": str(trunk.latent_channels),
        "width": repr(trunk.width),
    }
    _atomic_save_file(trunk.state_dict(), Path(path), metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_lpips(path: str | os.PathLike, ensemble: bool = True, **kwargs) -> LatentLPIPS:
    """Build (E-)LatentLPIPS from a file written by `save_lpips`; kwargs override other options."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT_LPIPS:
        raise CheckpointError(f"{path}: not a {FORMAT_LPIPS} file (format={meta.get('format')!r})")
    model = (ELatentLPIPS if ensemble else LatentLPIPS)(
        latent_channels=int(meta["latent_channels"]), width=float(meta["width"]), **kwargs
    )
    _assign(model, load_file(str(path)), {}, path)
    return model.eval()


def load_trunk_into(path: str | os.PathLike, trunk: LatentVGG16BN) -> LatentVGG16BN:
    """Fill `trunk` from our trunk safetensors, our full LPIPS safetensors, or an official trunk file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        tensors = load_file(str(path))
        if meta.get("format") == FORMAT_LPIPS:
            tensors = {k[len("trunk.") :]: v for k, v in tensors.items() if k.startswith("trunk.")}
        elif meta.get("format") != FORMAT_TRUNK:
            raise CheckpointError(f"{path}: unknown safetensors format {meta.get('format')!r}")
        _assign(trunk, tensors, {}, path)
        return trunk
    return load_official_trunk(path, trunk)


def trunk_file_shape(path: str | os.PathLike) -> tuple[int, float]:
    """(latent_channels, width) of any trunk source accepted by `load_trunk_into`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "latent_channels" not in meta:
            raise CheckpointError(f"{path}: metadata lacks 'latent_channels'")
        return int(meta["latent_channels"]), float(meta["width"])
    weight = official_trunk_state(path)["features.0.weight"]
    return int(weight.shape[1]), 1.0
