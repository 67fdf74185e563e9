"""store: a sharded, versioned pair store on any fsspec filesystem, and its streaming reader.

Format: docs/FORMAT.md. Every path and name inside a store root comes from `store.layout`; the
field names of a pair (NOISE, LATENT, PROMPT, ...) are constants from `store.schema`, exported
here. Import only what you need; torch is loaded lazily by the reader.
"""

from . import layout
from .errors import (
    CorruptShardError,
    FingerprintMismatch,
    StorageUnavailableError,
    StoreError,
    VersionConflict,
)
from .manifest import Manifest, ShardInfo
from .pairstore import PairStore
from .schema import (
    INDEX,
    JSON,
    KEY,
    LATENT,
    META,
    META_FIELDS,
    NOISE,
    POOLED_PROMPT_EMBEDS,
    PROMPT,
    PROMPT_EMBEDS,
    SEED,
    SHARD,
    TRAJECTORY,
    TRAJECTORY_TIMESTEPS,
    FieldSpec,
    Schema,
)
from .url import absolute_url, parse_url
from .writer import ShardDestination, ShardWriter

__all__ = [
    "PairStore", "Schema", "FieldSpec", "ShardInfo", "Manifest", "PairDataset", "PairLoader",
    "ShardWriter", "ShardDestination", "TaggedSample", "SkippedRun",
    "StoreError", "VersionConflict", "FingerprintMismatch", "CorruptShardError", "StorageUnavailableError",
    "parse_url", "absolute_url", "layout",
    "NOISE", "LATENT", "PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "TRAJECTORY",
    "KEY", "INDEX", "PROMPT", "SEED", "META", "JSON", "SHARD", "TRAJECTORY_TIMESTEPS", "META_FIELDS",
]


def __getattr__(name: str):
    """PairDataset, PairLoader and the loader's sample types, imported on first use: they pull in
    torch, and `import store` stays light for the CLI and pairgen."""
    if name in ("PairDataset", "TaggedSample", "SkippedRun"):
        from . import dataset

        return getattr(dataset, name)
    if name == "PairLoader":
        from .loader import PairLoader

        return PairLoader
    raise AttributeError(f"module 'store' has no attribute {name!r}")
