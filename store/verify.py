"""Checking a committed version against storage: sizes, hashes, counts, and (deep) every sample."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

from . import index as index_mod
from . import layout
from .errors import StorageUnavailableError, StoreError, is_transient, unavailable
from .manifest import Manifest, ShardInfo
from .pairstore import PairStore
from .schema import INDEX, JSON, KEY, Schema, parse_npy_header

# Tar bytes read per request while hashing.
CHUNK = 8 << 20


@dataclass(frozen=True)
class Problem:
    """What is wrong with one shard.

    Attributes:
        shard: the shard name.
        reason: the first problem found, in words.
    """

    shard: str
    reason: str


def verify_version(
    st: PairStore, m: Manifest, deep: bool = False, jobs: int = 4, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    """All problems found in version `m` of store `st`, at most one per shard (the first reason
    found). Checks each index and tar against the manifest's sizes and hashes; `deep` also checks
    every member's hash, every json record against its index row and every .npy header against
    the schema. `jobs` tars are hashed in parallel; `progress(n)` is called with bytes read.
    StorageUnavailableError (and no verdict) if the storage keeps failing through the client's
    retries.

    Index files are parsed on this thread (pyarrow used from short-lived reader threads can abort
    the interpreter at exit); only tar hashing runs in parallel. Shards go in batches so memory
    stays bounded for datasets with thousands of shards."""
    tick = progress or (lambda n: None)
    problems: list[Problem] = []
    batch = max(1, jobs) * 8
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for b in range(0, len(m.shards), batch):
            shards = m.shards[b : b + batch]
            prepared = _check_indexes(st, m.schema, shards, deep)
            todo = [(s, chk) for s, chk in zip(shards, prepared, strict=True) if not isinstance(chk, Problem)]
            found = {s.name: chk for s, chk in zip(shards, prepared, strict=True) if isinstance(chk, Problem)}
            for s, res in zip([t[0] for t in todo], pool.map(lambda t: _verify_tar(st, t[0], t[1], tick), todo), strict=True):
                if res is not None:
                    found[s.name] = res
            problems += [found[s.name] for s in shards if s.name in found]
    return problems


class _Bad(Exception):
    pass


def _check_indexes(st: PairStore, schema: Schema, shards, deep: bool) -> list:
    paths = [layout.index_path(st.root, s.name) for s in shards]
    blobs = st.fs.cat(paths, on_error="return")
    out: list = []
    for s, p in zip(shards, paths, strict=True):
        data = blobs.get(p)
        if isinstance(data, BaseException) and is_transient(data):
            # The storage failed, not the shard: no verdict on it (see _verify_tar).
            where = f"reading the index of shard {s.name} ({layout.index_path(st.url, s.name)})"
            raise unavailable(data, where) from data
        try:
            if not isinstance(data, bytes):
                if isinstance(data, FileNotFoundError) or data is None:
                    raise _Bad("index file missing")
                raise _Bad(f"index unreadable: {data}")
            out.append(_check_index(st, schema, s, data, deep))
        except _Bad as exc:
            out.append(Problem(s.name, str(exc)))
        except (OSError, StoreError, ValueError) as exc:
            out.append(Problem(s.name, f"index unreadable: {exc}"))
    return out


def _check_index(st: PairStore, schema: Schema, s: ShardInfo, data: bytes, deep: bool):
    if len(data) != s.index_bytes:
        raise _Bad(f"index is {len(data)} bytes, manifest says {s.index_bytes}")
    if xxhash.xxh3_64_hexdigest(data) != s.index_xxh3:
        raise _Bad("index xxh3 does not match the manifest")
    where = layout.index_path(st.url, s.name)
    meta = index_mod.read_meta(data, where)
    if int(meta["tar_bytes"]) != s.tar_bytes or meta["tar_xxh3"] != s.tar_xxh3:
        raise _Bad("index metadata disagrees with the manifest about the tar")
    table = index_mod.read_table(data, where)
    if table.num_rows != s.num_samples:
        raise _Bad(f"index has {table.num_rows} rows, manifest says {s.num_samples}")
    return _DeepChecker(schema, table) if deep else None


def _verify_tar(st: PairStore, s: ShardInfo, checker, tick) -> Problem | None:
    try:
        _check_tar(st, s, checker, tick)
    except _Bad as exc:
        return Problem(s.name, str(exc))
    except StorageUnavailableError:
        raise
    except Exception as exc:
        # A storage that kept failing through the client's retries gives no verdict on the shard:
        # calling it bad would send the user to regenerate good data. The whole check stops.
        if is_transient(exc):
            raise unavailable(exc, f"reading shard {s.name} ({st.shard_url(s.name)})") from exc
        if isinstance(exc, (OSError, StoreError, ValueError)):
            return Problem(s.name, f"tar unreadable: {exc}")
        raise
    return None


def _check_tar(st: PairStore, s: ShardInfo, checker, tick) -> None:
    h = xxhash.xxh3_64()
    size = 0
    try:
        with st.fs.open(layout.tar_path(st.root, s.name), "rb", block_size=CHUNK) as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                if checker is not None:
                    checker.feed(size, chunk)
                size += len(chunk)
                tick(len(chunk))
    except FileNotFoundError:
        raise _Bad("tar file missing") from None
    if size != s.tar_bytes:
        raise _Bad(f"tar is {size} bytes, manifest says {s.tar_bytes} (truncated or replaced)")
    if h.hexdigest() != s.tar_xxh3:
        raise _Bad("tar xxh3 does not match the manifest (content changed)")
    if checker is not None:
        checker.finish()


class _DeepChecker:
    """Checks each member as the tar streams past, holding at most one chunk plus one member."""

    def __init__(self, schema: Schema, table):
        self.schema = schema
        cols = table.to_pydict()
        self.keys = cols[KEY]
        self.indices = cols[INDEX]
        members = {m: (cols[index_mod.offset_column(m)], cols[index_mod.size_column(m)], cols[index_mod.hash_column(m)])
                   for m in index_mod.members(schema)}
        todo = []
        for r in range(table.num_rows):
            for m, (offsets, sizes, digests) in members.items():
                todo.append((offsets[r], sizes[r], digests[r], r, m))
        self.todo = sorted(todo)
        self.next = 0
        self.buf = bytearray()
        self.buf_start = 0

    def feed(self, pos: int, chunk: bytes) -> None:
        """Check every member that ends inside the bytes seen so far; `chunk` starts at tar offset `pos`."""
        if not self.buf:
            self.buf_start = pos
        self.buf += chunk
        end = self.buf_start + len(self.buf)
        while self.next < len(self.todo):
            off, size, digest, r, m = self.todo[self.next]
            if off + size > end:
                break
            blob = memoryview(self.buf)[off - self.buf_start : off - self.buf_start + size]
            self._check(blob, digest, r, m)
            blob.release()
            self.next += 1
        keep_from = self.todo[self.next][0] if self.next < len(self.todo) else end
        drop = max(0, min(keep_from, end) - self.buf_start)
        del self.buf[:drop]
        self.buf_start += drop

    def finish(self) -> None:
        """Called at the end of the tar: a member not seen by now lies past its end."""
        if self.next < len(self.todo):
            _, _, _, r, m = self.todo[self.next]
            raise _Bad(f"member {self.keys[r]}.{m} lies past the end of the tar")

    def _check(self, blob, digest: str, r: int, m: str) -> None:
        where = f"member {self.keys[r]}.{m}"
        if xxhash.xxh3_64_hexdigest(blob) != digest:
            raise _Bad(f"{where}: xxh3 mismatch")
        if m == JSON:
            rec = json.loads(bytes(blob))
            if rec.get(KEY) != self.keys[r] or rec.get(INDEX) != self.indices[r]:
                raise _Bad(f"{where}: json record does not match the index row")
            return
        spec = self.schema.fields[m]
        try:
            hlen, dtype, shape = parse_npy_header(blob)
        except (StoreError, ValueError) as exc:
            raise _Bad(f"{where}: bad .npy header ({exc})") from None
        if dtype != spec.storage_dtype():
            raise _Bad(f"{where}: dtype {dtype} but the schema says {spec.dtype}")
        if len(shape) != len(spec.shape) or any(a is not None and a != b for a, b in zip(spec.shape, shape, strict=True)):
            raise _Bad(f"{where}: shape {list(shape)} but the schema says {list(spec.shape)}")
        if len(blob) - hlen != int(np.prod(shape)) * dtype.itemsize:
            raise _Bad(f"{where}: payload size does not match its header")
