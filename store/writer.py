"""ShardWriter: streams samples into a webdataset tar and builds its Parquet index on the fly.

The tar is written through a StreamingUpload, so it appears at its final path only when complete;
the index is published last, so a shard without a matching index is simply not there yet.

The writer knows nothing of PairStore: it writes wherever its ShardDestination says, after the
destination's `prepare` check. PairStore.open_shard_writer() builds that destination.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import xxhash

from . import atomic, index, layout, tarfmt
from .errors import StoreError
from .manifest import ShardInfo
from .schema import INDEX, JSON, KEY, META, PROMPT, SEED, Schema, npy_header, to_storage_array


def sample_json(key: str, idx: int, prompt: str, seed: int, meta: dict | None) -> bytes:
    """The bytes of a sample's `KEY.json` member: sorted keys, compact, UTF-8 (deterministic)."""
    record = {KEY: key, INDEX: idx, PROMPT: prompt, SEED: seed}
    if meta:
        record[META] = meta
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _no_check() -> None:
    pass


@dataclass(frozen=True)
class ShardDestination:
    """Where a ShardWriter puts one shard, and what must happen before it writes a byte.

    Args:
        fs: the filesystem holding the store root.
        tar_path: where the tar goes (layout.tar_path).
        index_path: where the index goes (layout.index_path); it is published last.
        prepare: called once when the writer opens; raises to refuse the shard, and must remove
            any index already at `index_path`, so a crash mid-write cannot leave an old index
            vouching for the new tar.
    """

    fs: fsspec.AbstractFileSystem
    tar_path: str
    index_path: str
    prepare: Callable[[], None] = _no_check

    @classmethod
    def in_root(cls, fs: fsspec.AbstractFileSystem, root: str, name: str,
                prepare: Callable[[], None] = _no_check) -> ShardDestination:
        """The destination of shard `name` under the store root `root` (a path on `fs`)."""
        return cls(fs, layout.tar_path(root, name), layout.index_path(root, name), prepare)


class ShardWriter:
    """Writes one shard, as a context manager; `info` is its ShardInfo once the block exits cleanly.

    Nothing is visible while writing: an exception inside the block (or a crash) leaves no index,
    so readers and commits never see the partial tar, and writing the shard again replaces it.
    """

    def __init__(self, destination: ShardDestination, name: str, schema: Schema):
        """Set up the writer; nothing touches storage until the `with` block opens it.

        Args:
            destination: where the files go and the check to run first.
            name: the shard name (see layout); it is recorded in the index metadata.
            schema: the array fields every sample must carry, with their dtypes and shapes.
        """
        self.destination = destination
        self.name = name
        self.schema = schema
        self.info: ShardInfo | None = None
        self._rows = index.empty_rows(schema)
        self._keys: set[str] = set()
        self._pos = 0
        self._tar_hash = xxhash.xxh3_64()
        self._upload: atomic.StreamingUpload | None = None
        self._headers: dict[str, bytes] = {}

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        self.destination.prepare()
        self._upload = atomic.StreamingUpload(self.destination.fs, self.destination.tar_path)
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
        """Append one sample. Everything is checked before a byte is written, so a refused sample
        (StoreError naming the shard, key and field) leaves the shard as it was.

        Args:
            key: unique within the shard, non-empty, no '.' or '/' (layout.default_key(index) is
                the usual choice).
            index: the global sample index.
            prompt: the prompt text.
            seed: the noise seed.
            arrays: field name -> numpy array or torch tensor, exactly the schema's fields, each
                with the schema's dtype and shape.
            meta: optional JSON-able dict stored in the sample's json record under "meta".
        """
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
        blobs: list[tuple[str, list]] = [(JSON, [sample_json(key, int(index), str(prompt), int(seed), meta)])]
        for f, arr in stored.items():
            blobs.append((f, [self._header(f, arr), memoryview(arr).cast("B")]))
        for member, parts in blobs:
            self._write_member(layout.member_file(key, member), member, parts)
        self._keys.add(key)
        self._rows[KEY].append(key)
        self._rows[INDEX].append(int(index))
        self._rows[PROMPT].append(str(prompt))
        self._rows[SEED].append(int(seed))

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
        self._rows[index.offset_column(member)].append(offset)
        self._rows[index.size_column(member)].append(size)
        self._rows[index.hash_column(member)].append(h.hexdigest())

    def _emit(self, data) -> None:
        if len(data):
            self._upload.write(data)
            self._tar_hash.update(data)
            self._pos += len(data)

    # -- finishing --------------------------------------------------------------------------
    def _finish(self) -> None:
        if not self._rows[KEY]:
            raise StoreError(f"shard {self.name}: no samples written; an empty shard is not stored")
        self._emit(tarfmt.END_OF_ARCHIVE)
        self._upload.commit()
        self._upload = None
        tar_xxh3 = self._tar_hash.hexdigest()
        table = index.build_table(self._rows, self.schema, self.name, self._pos, tar_xxh3)
        data = index.to_bytes(table)
        atomic.replace(self.destination.fs, self.destination.index_path, data)
        self.info = ShardInfo(
            name=self.name,
            num_samples=len(self._rows[KEY]),
            first_index=self._rows[INDEX][0],
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
