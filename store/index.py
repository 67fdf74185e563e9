"""The per-shard Parquet index: one row per sample with the byte offset, size and xxh3 of each tar
member, plus shard-level facts (tar size and hash, schema) in the file's key-value metadata.
Written with fixed settings and no timestamps so the same shard always gives the same bytes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError
from .schema import Schema

FORMAT_VERSION = 1
META_PREFIX = "d2g."


def members(schema: Schema) -> list[str]:
    """Tar members of each sample in write order: the json record first, then the arrays."""
    return ["json", *schema.names]


def build_table(rows: dict[str, list], schema: Schema, shard: str, tar_bytes: int, tar_xxh3: str) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "key": pa.array(rows["key"], pa.string()),
        "index": pa.array(rows["index"], pa.int64()),
        "prompt": pa.array(rows["prompt"], pa.string()),
        "seed": pa.array(rows["seed"], pa.int64()),
    }
    for m in members(schema):
        cols[f"{m}_offset"] = pa.array(rows[f"{m}_offset"], pa.int64())
        cols[f"{m}_size"] = pa.array(rows[f"{m}_size"], pa.int64())
        cols[f"{m}_xxh3"] = pa.array(rows[f"{m}_xxh3"], pa.string())
    meta = {
        "format_version": str(FORMAT_VERSION),
        "shard": shard,
        "num_samples": str(len(rows["key"])),
        "first_index": str(rows["index"][0] if rows["index"] else 0),
        "tar_bytes": str(tar_bytes),
        "tar_xxh3": tar_xxh3,
        "schema": json.dumps(schema.to_dict(), sort_keys=True),
    }
    table = pa.table(cols)
    return table.replace_schema_metadata({f"{META_PREFIX}{k}": v for k, v in meta.items()})


def to_bytes(table: pa.Table) -> bytes:
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
    """The d2g key-value metadata of an index file (only the footer is parsed)."""
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
    try:
        # use_threads=False: pyarrow thread pools started from our reader threads can abort the
        # process at interpreter exit; index files are small, so one thread is plenty.
        return pq.read_table(io.BytesIO(data), use_threads=False)
    except Exception as exc:
        raise StoreError(f"{where}: not a readable Parquet index ({exc})") from exc
