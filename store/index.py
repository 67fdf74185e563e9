"""The per-shard Parquet index: one row per sample with the byte offset, size and xxh3 of each tar
member, plus shard-level facts (tar size and hash, schema) in the file's key-value metadata.
Written with fixed settings and no timestamps so the same shard always gives the same bytes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError
from .schema import INDEX, JSON, KEY, PROMPT, SEED, Schema

FORMAT_VERSION = 1
META_PREFIX = "d2g."
# Per-sample columns ahead of the per-member ones, in file order.
RECORD_COLUMNS = (KEY, INDEX, PROMPT, SEED)


def members(schema: Schema) -> list[str]:
    """Tar members of each sample in write order: the json record first, then the arrays."""
    return [JSON, *schema.names]


def offset_column(member: str) -> str:
    """The column holding the byte offset of `member`'s data in the tar: `{member}_offset`."""
    return f"{member}_offset"


def size_column(member: str) -> str:
    """The column holding the size of `member`'s data in bytes: `{member}_size`."""
    return f"{member}_size"


def hash_column(member: str) -> str:
    """The column holding the xxh3_64 of `member`'s data, 16 hex digits: `{member}_xxh3`."""
    return f"{member}_xxh3"


def empty_rows(schema: Schema) -> dict[str, list]:
    """Column name -> empty list for every column of an index of `schema`, for build_table."""
    rows: dict[str, list] = {c: [] for c in RECORD_COLUMNS}
    for m in members(schema):
        for col in (offset_column(m), size_column(m), hash_column(m)):
            rows[col] = []
    return rows


def build_table(rows: dict[str, list], schema: Schema, shard: str, tar_bytes: int, tar_xxh3: str) -> pa.Table:
    """The index table of one shard from its column lists (see empty_rows), with the shard-level
    facts in the d2g key-value metadata."""
    cols: dict[str, pa.Array] = {
        KEY: pa.array(rows[KEY], pa.string()),
        INDEX: pa.array(rows[INDEX], pa.int64()),
        PROMPT: pa.array(rows[PROMPT], pa.string()),
        SEED: pa.array(rows[SEED], pa.int64()),
    }
    for m in members(schema):
        cols[offset_column(m)] = pa.array(rows[offset_column(m)], pa.int64())
        cols[size_column(m)] = pa.array(rows[size_column(m)], pa.int64())
        cols[hash_column(m)] = pa.array(rows[hash_column(m)], pa.string())
    meta = {
        "format_version": str(FORMAT_VERSION),
        "shard": shard,
        "num_samples": str(len(rows[KEY])),
        "first_index": str(rows[INDEX][0] if rows[INDEX] else 0),
        "tar_bytes": str(tar_bytes),
        "tar_xxh3": tar_xxh3,
        "schema": json.dumps(schema.to_dict(), sort_keys=True),
    }
    table = pa.table(cols)
    return table.replace_schema_metadata({f"{META_PREFIX}{k}": v for k, v in meta.items()})


def to_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of an index table; fixed settings, so the same table gives the same bytes."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        write_statistics=True,
        store_schema=True,
        row_group_size=1 << 20,
    )
    return buf.getvalue()


def read_meta(data: bytes, where: str) -> dict:
    """The d2g key-value metadata of an index file, without the prefix (only the footer is
    parsed); `where` names the file in errors. Refuses a newer format version."""
    try:
        md = pq.read_metadata(io.BytesIO(data)).metadata or {}
    except Exception as exc:  # pyarrow raises ArrowInvalid & co for truncated files
        raise StoreError(f"{where}: not a readable Parquet index ({exc})") from exc
    out = {k.decode()[len(META_PREFIX):]: v.decode() for k, v in md.items() if k.startswith(META_PREFIX.encode())}
    missing = {"format_version", "tar_bytes", "tar_xxh3", "schema", "num_samples"} - set(out)
    if missing:
        raise StoreError(f"{where}: index metadata lacks {sorted(missing)}")
    if int(out["format_version"]) > FORMAT_VERSION:
        raise StoreError(
            f"{where}: index format_version {out['format_version']} is newer than supported ({FORMAT_VERSION}); upgrade d2g"
        )
    return out


def read_table(data: bytes, where: str) -> pa.Table:
    """The whole index table from its file bytes; `where` names the file in errors."""
    try:
        # use_threads=False: pyarrow thread pools started from our reader threads can abort the
        # process at interpreter exit; index files are small, so one thread is plenty.
        return pq.read_table(io.BytesIO(data), use_threads=False)
    except Exception as exc:
        raise StoreError(f"{where}: not a readable Parquet index ({exc})") from exc
