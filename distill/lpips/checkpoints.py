"""Load official E-LatentLPIPS checkpoints from local files; save and load our own safetensors.

Official layouts (read with `torch.load(weights_only=True)` only: never unpickle objects):
  * trunk   `{enc}_latent_vgg16.pth.tar`: {"state_dict": {"model.features.N.*", ...}, "best_acc1": x}
    with keys possibly prefixed `module.` (DataParallel). torchvision's classifier keys
    (`model.classifier.{0,3,6}.{weight,bias}`) belong to the file's model and are accepted unread.
  * tuned   `{enc}_latest_vgg16_tuned.pth`: {"net.sliceK.N.*" (N = vgg16_bn features index in
    slice K's range [0,7) [7,14) [14,24) [24,34) [34,44); batch-norm running statistics included),
    "linK.model.1.weight", duplicated as "lins.K.model.1.weight"}, possibly `module.`-prefixed.
Ours: one safetensors file with our module's own keys and a small metadata header naming its kind.

Loading is strict, like the published loader: an unknown, missing or mis-shaped key is refused
with a one-line `CheckpointError` naming the file and the key(s), and a file of the other kind (a
trunk where a calibrated file is expected, or the reverse) is named as such. The only key that may
be absent is batch norm's `num_batches_tracked` counter (torch fills it in for older files too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from store.atomic import write_local_file

from .latent_lpips import ELatentLPIPS, LatentLPIPS
from .trunk import NUM_POOLS_REMOVED, LatentVGG16BN, slice_of

FORMAT_LPIPS = "d2g-latent-lpips/1"
FORMAT_TRUNK = "d2g-latent-vgg16bn-trunk/1"
# Buffers a checkpoint may legitimately lack (older torch did not save them).
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# torchvision vgg16_bn's classifier, present in official trunk files and not used here.
CLASSIFIER_KEYS = frozenset(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))

KIND_TRUNK = "a LatentLPIPS trunk checkpoint"
KIND_TUNED = "a calibrated LatentLPIPS checkpoint (trunk + heads)"

_SLICE_KEY = re.compile(r"^net\.slice(\d+)\.(\d+)\.(.+)$")
_LIN_KEY = re.compile(r"^lin(\d+)\.model\.1\.weight$")
_LINS_KEY = re.compile(r"^lins\.(\d+)\.model\.1\.weight$")
_TUNED_KEY = re.compile(r"^(module\.)?(net\.slice\d|lins?\d*\.)")
_TRUNK_KEY = re.compile(r"^(module\.)?(model\.)?(module\.)?(features|classifier)\.")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the one-line message names the file and the key(s)."""


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _keys_text(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:8])
    return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _torch_load(path: str | os.PathLike) -> dict:
    """A dict read with `torch.load(weights_only=True)`; one-line CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): {_one_line(err)}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _assign(target: nn.Module, mapped: dict[str, torch.Tensor], sources: dict[str, str], path: Path) -> None:
    """Strictly copy `mapped` (our keys) into `target`.

    Refuses, in one line naming the file and the checkpoint's own key names (`sources`: our key ->
    theirs): keys the model does not have, keys it needs that are missing, and shape mismatches.
    """
    own = target.state_dict()
    name = lambda key: sources.get(key, key)  # noqa: E731
    unknown = [name(k) for k in mapped if k not in own]
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {_keys_text(unknown)}")
    missing = [name(k) for k in own if k not in mapped and not k.endswith(OPTIONAL_SUFFIXES)]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {_keys_text(missing)}")
    for key, tensor in own.items():
        if key in mapped and tuple(mapped[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: key {name(key)!r} has shape {tuple(mapped[key].shape)}, "
                f"the model expects {tuple(tensor.shape)} for {key!r}"
            )
    with torch.no_grad():
        for key, tensor in own.items():
            if key in mapped:
                tensor.copy_(mapped[key].to(tensor.dtype))


def _official_kind(state: dict) -> str | None:
    """KIND_TRUNK / KIND_TUNED from the keys of an official state dict, None if neither."""
    keys = [k for k in state if isinstance(k, str)]
    if any(_TUNED_KEY.match(k) for k in keys):
        return KIND_TUNED
    if any(_TRUNK_KEY.match(k) for k in keys):
        return KIND_TRUNK
    return None


def _wrong_kind(path: Path, found: str, wanted: str) -> CheckpointError:
    return CheckpointError(f"{path} is {found}, not {wanted}")


def _official_state(path: Path, wanted: str) -> dict:
    """The state dict of an official file, refusing a file of the other kind by name."""
    obj = _torch_load(path)
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict")
    kind = _official_kind(state)
    if kind is not None and kind != wanted:
        raise _wrong_kind(path, kind, wanted)
    if kind is None:
        raise CheckpointError(f"{path}: no key of {wanted} found (first keys: {_keys_text(list(state)[:3])})")
    return state


def _strip_trunk_prefix(key: str) -> str:
    # DataParallel adds `module.` and the official training wrapped torchvision under `model.`.
    for prefix in ("module.model.", "model.module.", "model.", "module."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def official_trunk_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`features.N.*` tensors of an official trunk file and our key -> their key; strict.

    Args:
        path: an official `{enc}_latent_vgg16.pth.tar`.
    """
    path = Path(path)
    state = _official_state(path, KIND_TRUNK)
    features: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown = []
    for key, value in state.items():
        stripped = _strip_trunk_prefix(str(key))
        if stripped in CLASSIFIER_KEYS:
            continue  # torchvision's classifier: part of the file's model, not of ours
        if not stripped.startswith("features.") or not isinstance(value, torch.Tensor):
            unknown.append(str(key))
            continue
        features[stripped] = value
        sources[stripped] = str(key)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {_keys_text(unknown)}")
    return features, sources


def load_official_trunk(path: str | os.PathLike, trunk: LatentVGG16BN) -> LatentVGG16BN:
    """Load an official `{enc}_latent_vgg16.pth.tar` into `trunk` in place (strict).

    Args:
        path: the trunk file.
        trunk: a full-width trunk with the file's latent channels.
    """
    features, sources = official_trunk_state(path)
    names = {k: f"model.{k}" for k in trunk.state_dict()}
    _assign(trunk, features, {**names, **sources}, Path(path))
    return trunk


def official_tuned_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map an official tuned file onto our LatentLPIPS keys; returns (tensors, our key -> their key).

    Strict: a key that is neither `net.sliceK.N.*` (with N in slice K) nor a head
    `linK.model.1.weight` / `lins.K.model.1.weight` is refused, as are disagreeing duplicates.

    Args:
        path: an official `{enc}_latest_vgg16_tuned.pth`.
    """
    path = Path(path)
    state = _official_state(path, KIND_TUNED)
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    duplicates: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for raw_key, value in state.items():
        key = str(raw_key).removeprefix("module.")
        if not isinstance(value, torch.Tensor):
            unknown.append(str(raw_key))
            continue
        if m := _SLICE_KEY.match(key):
            slice_no, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            try:
                expected_slice = slice_of(index)
            except ValueError:
                unknown.append(str(raw_key))
                continue
            if expected_slice != slice_no:
                raise CheckpointError(
                    f"{path}: key {raw_key!r} puts features index {index} in slice{slice_no}, "
                    f"expected slice{expected_slice}"
                )
            ours = f"trunk.features.{index}.{rest}"
        elif m := _LIN_KEY.match(key):
            ours = f"lins.{m.group(1)}.model.1.weight"
        elif m := _LINS_KEY.match(key):
            duplicates[f"lins.{m.group(1)}.model.1.weight"] = (str(raw_key), value)
            continue
        else:
            unknown.append(str(raw_key))
            continue
        mapped[ours] = value
        sources[ours] = str(raw_key)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {_keys_text(unknown)}")
    for ours, (raw_key, value) in duplicates.items():
        if ours not in mapped:
            mapped[ours], sources[ours] = value, raw_key
        elif mapped[ours].shape != value.shape or not torch.equal(mapped[ours], value):
            raise CheckpointError(f"{path}: {raw_key!r} disagrees with its duplicate {sources[ours]!r}")
    return mapped, sources


def _expected_sources(model: LatentLPIPS) -> dict[str, str]:
    """Our key -> the official tuned file's name for it (for naming missing keys)."""
    sources = {}
    for name in model.state_dict():
        if name.startswith("trunk.features."):
            index = int(name.split(".")[2])
            rest = ".".join(name.split(".")[3:])
            sources[name] = f"net.slice{slice_of(index)}.{index}.{rest}"
        elif name.startswith("lins."):
            sources[name] = f"lin{name.split('.')[1]}.model.1.weight"
    return sources


def load_official_tuned(path: str | os.PathLike, model: LatentLPIPS) -> LatentLPIPS:
    """Load an official `{enc}_latest_vgg16_tuned.pth` (trunk + heads) into `model` in place (strict).

    Args:
        path: the tuned file.
        model: a full-width (E-)LatentLPIPS with the file's latent channels.
    """
    mapped, sources = official_tuned_state(path)
    _assign(model, mapped, {**_expected_sources(model), **sources}, Path(path))
    return model


def infer_latent_channels(path: str | os.PathLike) -> int:
    """Latent channels of an official tuned file (from the first convolution's weight).

    Args:
        path: an official `{enc}_latest_vgg16_tuned.pth`.
    """
    mapped, _ = official_tuned_state(path)
    weight = mapped.get("trunk.features.0.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(f"{path}: missing key(s) 'net.slice1.0.weight'")
    return int(weight.shape[1])


def from_official(path: str | os.PathLike, ensemble: bool = True, **kwargs) -> LatentLPIPS:
    """Build (E-)LatentLPIPS at the official width from a tuned file, in eval mode.

    Args:
        path: an official `{enc}_latest_vgg16_tuned.pth` (a trunk file is refused by name).
        ensemble: E-LatentLPIPS (True) or plain LatentLPIPS.
        **kwargs: further LatentLPIPS/E-LatentLPIPS options; latent_channels defaults to the file's.
    """
    kwargs.setdefault("latent_channels", infer_latent_channels(path))
    model = (ELatentLPIPS if ensemble else LatentLPIPS)(**kwargs)
    return load_official_tuned(path, model).eval()


# --- our own safetensors files -------------------------------------------------------------------


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_local_file(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def save_lpips(model: LatentLPIPS, path: str | os.PathLike) -> None:
    """Write trunk + heads + construction metadata atomically (a calibrated LatentLPIPS file).

    Args:
        model: the (E-)LatentLPIPS to save.
        path: the `.safetensors` file to write.
    """
    metadata = {
        "format": FORMAT_LPIPS,
        "latent_channels": str(model.latent_channels),
        "width": repr(model.width),
        "pools_removed": str(model.pools_removed),
    }
    _save_safetensors(model.state_dict(), Path(path), metadata)


def save_trunk(trunk: LatentVGG16BN, path: str | os.PathLike) -> None:
    """Write a trunk and its construction metadata atomically (a LatentLPIPS trunk file).

    Args:
        trunk: the trunk to save.
        path: the `.safetensors` file to write.
    """
    metadata = {
        "format": FORMAT_TRUNK,
        "latent_channels": str(trunk.latent_channels),
        "width": repr(trunk.width),
        "pools_removed": str(trunk.pools_removed),
    }
    _save_safetensors(trunk.state_dict(), Path(path), metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a safetensors file; one-line CheckpointError if it is not one.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {_one_line(err)}") from err


def _our_kind(path: Path, meta: dict[str, str]) -> str:
    fmt = meta.get("format")
    if fmt == FORMAT_LPIPS:
        return KIND_TUNED
    if fmt == FORMAT_TRUNK:
        return KIND_TRUNK
    raise CheckpointError(
        f"{path}: not a d2g LatentLPIPS file (format={fmt!r}; expected {FORMAT_LPIPS!r} or {FORMAT_TRUNK!r})"
    )


def _meta_shape(path: Path, meta: dict[str, str]) -> tuple[int, float, int]:
    # Files written before pixel trunks existed have no "pools_removed": they are latent trunks.
    try:
        return int(meta["latent_channels"]), float(meta["width"]), int(meta.get("pools_removed", NUM_POOLS_REMOVED))
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path}: metadata lacks a valid 'latent_channels'/'width'/'pools_removed': {_one_line(err)}"
        ) from err


def load_lpips(path: str | os.PathLike, ensemble: bool = True, **kwargs) -> LatentLPIPS:
    """Build (E-)LatentLPIPS from a file written by `save_lpips`, in eval mode (strict).

    Args:
        path: our calibrated `.safetensors` (a trunk file is refused by name).
        ensemble: E-LatentLPIPS (True) or plain LatentLPIPS.
        **kwargs: further options (l1_weight, normalize, vae, augment...); channels, width and
            pools_removed come from the file.
    """
    path = Path(path)
    meta = read_metadata(path)
    kind = _our_kind(path, meta)
    if kind != KIND_TUNED:
        raise _wrong_kind(path, kind, KIND_TUNED)
    channels, width, pools_removed = _meta_shape(path, meta)
    model = (ELatentLPIPS if ensemble else LatentLPIPS)(
        latent_channels=channels, width=width, pools_removed=pools_removed, **kwargs
    )
    _assign(model, load_file(str(path)), {}, path)
    return model.eval()


def load_trunk_into(path: str | os.PathLike, trunk: LatentVGG16BN) -> LatentVGG16BN:
    """Fill `trunk` from our trunk safetensors, our full LPIPS safetensors, or an official trunk file.

    Args:
        path: the weights file.
        trunk: a trunk of the file's channels and width.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        kind = _our_kind(path, meta)
        tensors = load_file(str(path))
        if kind == KIND_TUNED:  # the trunk of a calibrated file; its heads are not needed here
            tensors = {k.removeprefix("trunk."): v for k, v in tensors.items() if not k.startswith("lins.")}
        _assign(trunk, tensors, {}, path)
        return trunk
    return load_official_trunk(path, trunk)


def trunk_file_shape(path: str | os.PathLike) -> tuple[int, float, int]:
    """(latent_channels, width, pools_removed) of any trunk source accepted by `load_trunk_into`.

    Args:
        path: the weights file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        _our_kind(path, meta)
        return _meta_shape(path, meta)
    features, _ = official_trunk_state(path)
    weight = features.get("features.0.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(f"{path}: missing key(s) 'model.features.0.weight'")
    return int(weight.shape[1]), 1.0, NUM_POOLS_REMOVED
