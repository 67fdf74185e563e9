"""The pair schema: the field names every writer and reader of pairs agrees on, the per-sample
array schema (field name -> dtype, shape) of one store, and .npy encode/decode.

numpy has no bfloat16, so a bfloat16 field is stored as the raw 16-bit words in a '<u2' .npy and
the schema records dtype "bfloat16"; readers reinterpret the bits (torch.bfloat16), nothing is
rounded. Every other dtype is stored as itself, little-endian, C order.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from .errors import StoreError

# -- field names -----------------------------------------------------------------------------
# Array fields: one `KEY.FIELD.npy` tar member each. A store holds the subset its Schema lists;
# these are the ones pairgen writes (docs/FORMAT.md).
NOISE = "noise"  # the exact tensor the teacher's solver started from
LATENT = "latent"  # the teacher's output latent for that noise and prompt
PROMPT_EMBEDS = "prompt_embeds"  # text-encoder token embeddings (optional)
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"  # pooled text embedding, SDXL-style teachers (optional)
TRAJECTORY = "trajectory"  # intermediate ODE points, stacked on dim 0 (optional)

# Record fields: in each sample's `KEY.json` member and, except `meta`, as index columns.
KEY = "key"
INDEX = "index"
PROMPT = "prompt"
SEED = "seed"
META = "meta"  # optional free-form dict written with the sample
JSON = "json"  # the raw JSON record: a tar member, and a field readers may ask for
SHARD = "shard"  # added by PairStore.get() to name the shard a sample came from
TRAJECTORY_TIMESTEPS = "trajectory_timesteps"  # key in META: the timestep of each TRAJECTORY point

# Fields a reader can ask for that are not .npy members: they come from the index or the record.
META_FIELDS = (PROMPT, SEED, JSON)

BF16 = "bfloat16"
# Lower-case and no dots: webdataset splits member names at the first dot.
_FIELD_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Array fields may not take these names: they would clash with index columns or record keys.
RESERVED_FIELDS = frozenset({JSON, KEY, INDEX, PROMPT, SEED, META, SHARD})


@dataclass(frozen=True)
class FieldSpec:
    """The dtype and shape every sample's array of one field has.

    Args:
        dtype: numpy dtype name ("float32", "float16", ...) or "bfloat16".
        shape: the array shape; None marks a dimension that may vary between samples.
    """

    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))
        if self.dtype != BF16:
            try:
                np.dtype(self.dtype)
            except TypeError as exc:
                raise StoreError(f"unknown dtype {self.dtype!r} in field spec") from exc

    def storage_dtype(self) -> np.dtype:
        """The little-endian numpy dtype the bytes are stored in ('<u2' words for bfloat16)."""
        return np.dtype("<u2") if self.dtype == BF16 else np.dtype(self.dtype).newbyteorder("<")

    def to_dict(self) -> dict:
        """The JSON form used in manifests and index metadata: {"dtype": ..., "shape": [...]}."""
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> FieldSpec:
        """The inverse of to_dict()."""
        return cls(dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class Schema:
    """The array fields of one store, in the order their members are written for each sample.

    Args:
        fields: field name -> FieldSpec. Names are lower-case `[a-z][a-z0-9_]*` and not one of
            RESERVED_FIELDS; at least one field is required.
    """

    fields: dict[str, FieldSpec]

    def __post_init__(self) -> None:
        if not self.fields:
            raise StoreError("a schema needs at least one array field")
        for name in self.fields:
            if not _FIELD_RE.match(name) or name in RESERVED_FIELDS:
                raise StoreError(
                    f"bad field name {name!r}: use lower-case letters, digits and '_' (no dots), "
                    f"not one of {sorted(RESERVED_FIELDS)}"
                )

    def __hash__(self) -> int:  # dict field makes the dataclass unhashable otherwise
        return hash(tuple((k, v) for k, v in self.fields.items()))

    @property
    def names(self) -> list[str]:
        """The field names, in schema order."""
        return list(self.fields)

    def to_dict(self) -> dict:
        """The JSON form used in manifests and index metadata: {"fields": {name: spec, ...}}."""
        return {"fields": {k: v.to_dict() for k, v in self.fields.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        """The inverse of to_dict()."""
        return cls({k: FieldSpec.from_dict(v) for k, v in d["fields"].items()})

    @classmethod
    def from_arrays(cls, arrays: dict) -> Schema:
        """A schema matching one example sample (numpy arrays or torch tensors)."""
        return cls({k: FieldSpec(dtype_name(v), tuple(v.shape)) for k, v in arrays.items()})


def dtype_name(arr) -> str:
    """Our dtype name for a numpy array or torch tensor."""
    if isinstance(arr, np.ndarray):
        return arr.dtype.name
    name = str(getattr(arr, "dtype", ""))
    if name.startswith("torch."):
        return name[len("torch."):]
    raise StoreError(f"expected a numpy array or torch tensor, got {type(arr).__name__}")


def to_storage_array(arr, spec: FieldSpec, where: str) -> np.ndarray:
    """Validate `arr` against `spec` and return the exact array whose bytes get stored."""
    got = dtype_name(arr)
    if got != spec.dtype:
        raise StoreError(f"{where}: dtype {got} does not match the schema's {spec.dtype}")
    shape = tuple(arr.shape)
    if len(shape) != len(spec.shape) or any(s is not None and s != g for s, g in zip(spec.shape, shape, strict=True)):
        raise StoreError(f"{where}: shape {list(shape)} does not match the schema's {list(spec.shape)}")
    if not isinstance(arr, np.ndarray):
        import torch

        t = arr.detach().cpu().contiguous()
        arr = t.view(torch.int16).numpy().view("<u2") if t.dtype == torch.bfloat16 else t.numpy()
    return np.ascontiguousarray(arr, dtype=spec.storage_dtype())


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy (format 1.0) header numpy itself would write: deterministic for a dtype/shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def parse_npy_header(data) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(header length, dtype, shape) of a .npy blob; raises StoreError if it is not one."""
    mv = memoryview(data)
    if bytes(mv[:6]) != b"\x93NUMPY":
        raise StoreError("not a .npy blob (bad magic)")
    major = mv[6]
    if major == 1:
        hlen = 10 + int.from_bytes(mv[8:10], "little")
    else:
        hlen = 12 + int.from_bytes(mv[8:12], "little")
    fp = io.BytesIO(bytes(mv[:hlen]))
    np.lib.format.read_magic(fp)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    if fortran:
        raise StoreError(".npy blob is Fortran-ordered; the store only writes C order")
    return hlen, dtype, tuple(shape)
