"""ShardWriter: streams samples into a webdataset tar and builds its Parquet index on the fly.

The tar goes straight to its final location through a StreamingUpload (visible only when done);
the index is published last, so a shard without a matching index is simply not there yet.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from . import atomic, index, tarfmt
from .errors import StoreError
from .manifest import ShardInfo
from .schema import Schema, npy_header, to_storage_array

if TYPE_CHECKING:
    from .pairstore import PairStore


def sample_json(key: str, idx: int, prompt: str, seed: int, meta: dict | None) -> bytes:
    record = {"key": key, "index": idx, "prompt": prompt, "seed": seed}
    if meta:
        record["meta"] = meta
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class ShardWriter:
    def __init__(self, store: PairStore, name: str, schema: Schema):
        self.store = store
        self.name = name
        self.schema = schema
        self.info: ShardInfo | None = None
        self._members = index.members(schema)
        self._rows: dict[str, list] = {c: [] for c in ("key", "index", "prompt", "seed")}
        for m in self._members:
            for suffix in ("offset", "size", "xxh3"):
                self._rows[f"{m}_{suffix}"] = []
        self._keys: set[str] = set()
        self._pos = 0
        self._tar_hash = xxhash.xxh3_64()
        self._upload: atomic.StreamingUpload | None = None
        self._headers: dict[str, bytes] = {}

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        self.store._prepare_shard_write(self.name)
        self._upload = atomic.StreamingUpload(self.store.fs, self.store._tar_path(self.name))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort()
            return False
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
        return False

    # -- writing ----------------------------------------------------------------------------
    def write(self, key: str, index: int, prompt: str, seed: int, arrays: dict, meta: dict | None = None) -> None:
        if self._upload is None:
            raise StoreError(f"shard {self.name}: use the writer inside `with store.open_shard_writer(...)`")
        where = f"shard {self.name}, key {key!r}"
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise StoreError(f"{where}: keys must be non-empty and contain no '.' or '/' (webdataset splits at the first dot)")
        if key in self._keys:
            raise StoreError(f"{where}: duplicate key in shard")
        missing = [f for f in self.schema.names if f not in arrays]
        if missing:
            raise StoreError(f"{where}: missing field(s) {missing} required by the schema")
        unknown = [f for f in arrays if f not in self.schema.fields]
        if unknown:
            raise StoreError(f"{where}: field(s) {unknown} are not in the schema {self.schema.names}")
        # Validate everything before writing a byte, so a bad sample never leaves half a record.
        stored = {f: to_storage_array(arrays[f], spec, f"{where}, field {f!r}") for f, spec in self.schema.fields.items()}
        blobs: list[tuple[str, list]] = [("json", [sample_json(key, int(index), str(prompt), int(seed), meta)])]
        for f, arr in stored.items():
            blobs.append((f, [self._header(f, arr), memoryview(arr).cast("B")]))
        for member, parts in blobs:
            self._write_member(f"{key}.{member}" + ("" if member == "json" else ".npy"), member, parts)
        self._keys.add(key)
        self._rows["key"].append(key)
        self._rows["index"].append(int(index))
        self._rows["prompt"].append(str(prompt))
        self._rows["seed"].append(int(seed))

    def _header(self, field: str, arr: np.ndarray) -> bytes:
        # Same dtype and shape -> same header; cache it unless the field has wildcard dims.
        h = self._headers.get(field)
        if h is None or None in self.schema.fields[field].shape:
            h = npy_header(arr)
            self._headers[field] = h
        return h

    def _write_member(self, name: str, member: str, parts: list) -> None:
        size = sum(len(p) for p in parts)
        header = tarfmt.member_header(name, size)
        self._emit(header)
        offset = self._pos
        h = xxhash.xxh3_64()
        for p in parts:
            h.update(p)
            self._emit(p)
        self._emit(tarfmt.padding(size))
        self._rows[f"{member}_offset"].append(offset)
        self._rows[f"{member}_size"].append(size)
        self._rows[f"{member}_xxh3"].append(h.hexdigest())

    def _emit(self, data) -> None:
        if len(data):
            self._upload.write(data)
            self._tar_hash.update(data)
            self._pos += len(data)

    # -- finishing --------------------------------------------------------------------------
    def _finish(self) -> None:
        if not self._rows["key"]:
            raise StoreError(f"shard {self.name}: no samples written; an empty shard is not stored")
        self._emit(tarfmt.END_OF_ARCHIVE)
        self._upload.commit()
        self._upload = None
        tar_xxh3 = self._tar_hash.hexdigest()
        table = index.build_table(self._rows, self.schema, self.name, self._pos, tar_xxh3)
        data = index.to_bytes(table)
        atomic.replace(self.store.fs, self.store._index_path(self.name), data)
        self.info = ShardInfo(
            name=self.name,
            num_samples=len(self._rows["key"]),
            first_index=self._rows["index"][0],
            tar_bytes=self._pos,
            tar_xxh3=tar_xxh3,
            index_bytes=len(data),
            index_xxh3=xxhash.xxh3_64_hexdigest(data),
        )

    def _abort(self) -> None:
        if self._upload is not None:
            try:
                self._upload.abort()
            except Exception:  # best effort: the missing index already makes the tar invisible
                pass
            self._upload = None
