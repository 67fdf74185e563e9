"""store: a sharded, versioned pair store on any fsspec filesystem, and its streaming reader.

Format: docs/FORMAT.md. Import only what you need; torch is loaded lazily by the reader.
"""

from .errors import CorruptShardError, FingerprintMismatch, StoreError, VersionConflict
from .manifest import Manifest, ShardInfo
from .pairstore import PairStore
from .schema import FieldSpec, Schema
from .url import parse_url

__all__ = [
    "PairStore", "Schema", "FieldSpec", "ShardInfo", "Manifest", "PairDataset", "PairLoader",
    "StoreError", "VersionConflict", "FingerprintMismatch", "CorruptShardError", "parse_url",
]


def __getattr__(name: str):
    # The dataset and loader pull in torch; keep `import store` light for the CLI and pairgen.
    if name == "PairDataset":
        from .dataset import PairDataset

        return PairDataset
    if name == "PairLoader":
        from .loader import PairLoader

        return PairLoader
    raise AttributeError(f"module 'store' has no attribute {name!r}")
