"""Every path and file name inside a store root, one rule each (the format is docs/FORMAT.md).

```
ROOT/fingerprint.json             fingerprint_path(ROOT)
ROOT/shards/shard-000012.tar      tar_path(ROOT, "shard-000012")
ROOT/index/shard-000012.parquet   index_path(ROOT, "shard-000012")
ROOT/versions/v000003.json        manifest_path(ROOT, 3)
ROOT/**/.NAME.tmp-<pid>-<rand>    temp_path(path): a writer's file in progress, ignored by readers
```

Writers, readers, the CLI and pairgen build and parse these names only through this module, so a
name can never be spelled two ways. `ROOT` may be a protocol-less filesystem path (for I/O) or the
user's URL (for messages): the same rule gives both. Changing anything here changes the on-disk
format.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid

from .schema import JSON

FINGERPRINT_FILE = "fingerprint.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
VERSIONS_DIR = "versions"

TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".parquet"
MANIFEST_SUFFIX = ".json"
NPY_SUFFIX = ".npy"

SHARD_PREFIX = "shard-"
# Readers skip every name starting with this: pyarrow.dataset and most listers already do, so a
# writer's temp file never looks like data to our code or to plain tools.
HIDDEN_PREFIX = "."

SHARD_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_SHARD_NAME_RE = re.compile(rf"^{SHARD_NAME_PATTERN}$")
_MANIFEST_FILE_RE = re.compile(r"^v(\d{6,})\.json$")
_NUMBERED_SHARD_RE = re.compile(r"^shard-(\d{6,})(?:-p\d{6,})?$")


# -- shard and sample names ----------------------------------------------------------------------
def shard_name(number: int) -> str:
    """The name of shard `number`: `shard-000012`."""
    return f"{SHARD_PREFIX}{int(number):06d}"


def partial_shard_name(number: int, count: int) -> str:
    """The name of a shard cut short at `count` samples: `shard-000012-p000232`. pairgen gives a
    short last shard its own name so that growing the dataset later writes the full shard under a
    new name instead of overwriting one a version may already list."""
    return f"{shard_name(number)}-p{int(count):06d}"


def shard_number(name: str) -> int | None:
    """The number in a `shard_name` or `partial_shard_name`; None for any other name."""
    m = _NUMBERED_SHARD_RE.match(name)
    return None if m is None else int(m.group(1))


def is_valid_shard_name(name: object) -> bool:
    """Whether `name` may name a shard: letters, digits, '-' and '_', not starting with '-'/'_'
    (so never hidden and never a path)."""
    return isinstance(name, str) and _SHARD_NAME_RE.match(name) is not None


def default_key(index: int) -> str:
    """The default sample key: the zero-padded global index, `000000000012`. Digits only, so it
    holds no '.' (webdataset splits member names at the first dot) and sorts like the index."""
    return f"{int(index):012d}"


def member_file(key: str, member: str) -> str:
    """The tar member name of one sample's `member`: `KEY.json` for the record, `KEY.FIELD.npy`
    for an array field."""
    return f"{key}.{JSON}" if member == JSON else f"{key}.{member}{NPY_SUFFIX}"


# -- file names inside their directories ----------------------------------------------------------
def tar_file(name: str) -> str:
    """The file name of shard `name`'s tar inside `shards/`."""
    return f"{name}{TAR_SUFFIX}"


def index_file(name: str) -> str:
    """The file name of shard `name`'s Parquet index inside `index/`."""
    return f"{name}{INDEX_SUFFIX}"


def manifest_file(version: int) -> str:
    """The file name of version `version`'s manifest inside `versions/`: `v000003.json`."""
    return f"v{int(version):06d}{MANIFEST_SUFFIX}"


def is_hidden(file_name: str) -> bool:
    """Whether a file name is hidden (a temp file of a writer in progress); readers skip these."""
    return file_name.startswith(HIDDEN_PREFIX)


def shard_of_tar_file(file_name: str) -> str | None:
    """The shard name a file in `shards/` holds the tar of, or None (hidden or not a tar)."""
    if is_hidden(file_name) or not file_name.endswith(TAR_SUFFIX):
        return None
    return file_name[: -len(TAR_SUFFIX)]


def shard_of_index_file(file_name: str) -> str | None:
    """The shard name a file in `index/` holds the index of, or None (hidden or not an index)."""
    if is_hidden(file_name) or not file_name.endswith(INDEX_SUFFIX):
        return None
    return file_name[: -len(INDEX_SUFFIX)]


def version_of_manifest_file(file_name: str) -> int | None:
    """The version a file in `versions/` is the manifest of, or None for any other file."""
    m = _MANIFEST_FILE_RE.match(file_name)
    return None if m is None else int(m.group(1))


# -- paths under a root ---------------------------------------------------------------------------
def fingerprint_path(root: str) -> str:
    """`ROOT/fingerprint.json`: the generation settings every shard of the root was made with."""
    return posixpath.join(root, FINGERPRINT_FILE)


def shards_dir(root: str) -> str:
    """`ROOT/shards`: the shard tars."""
    return posixpath.join(root, SHARDS_DIR)


def index_dir(root: str) -> str:
    """`ROOT/index`: the per-shard Parquet indexes (readable as one pyarrow dataset)."""
    return posixpath.join(root, INDEX_DIR)


def versions_dir(root: str) -> str:
    """`ROOT/versions`: the immutable version manifests."""
    return posixpath.join(root, VERSIONS_DIR)


def tar_path(root: str, name: str) -> str:
    """`ROOT/shards/NAME.tar`."""
    return posixpath.join(shards_dir(root), tar_file(name))


def index_path(root: str, name: str) -> str:
    """`ROOT/index/NAME.parquet`."""
    return posixpath.join(index_dir(root), index_file(name))


def manifest_path(root: str, version: int) -> str:
    """`ROOT/versions/v{version:06d}.json`."""
    return posixpath.join(versions_dir(root), manifest_file(version))


def is_temp_of(file_name: str, target_name: str) -> bool:
    """Whether `file_name` is a `temp_path` of a file named `target_name` (in the same folder)."""
    return file_name.startswith(f"{HIDDEN_PREFIX}{target_name}.tmp-")


def temp_path(path: str) -> str:
    """A fresh hidden sibling of `path` to write before publishing it: `.NAME.tmp-<pid>-<rand>`.
    The pid and random part keep concurrent writers of the same target apart."""
    d, name = posixpath.split(path)
    return posixpath.join(d, f"{HIDDEN_PREFIX}{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
