"""PairStore: one dataset root on any fsspec filesystem (layout in docs/FORMAT.md)."""

from __future__ import annotations

import bisect
import json
import os
import posixpath
import re
import threading
from datetime import datetime, timezone

import fsspec
import xxhash

from . import atomic, index
from .errors import FingerprintMismatch, StoreError, VersionConflict
from .manifest import Manifest, ShardInfo, check_no_credentials, fingerprint_diff
from .schema import Schema
from .url import filesystem, parse_url

_VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("d2g")
    except Exception:
        return "unknown"


class PairStore:
    """A dataset root. Construction touches nothing on storage."""

    def __init__(self, url: str, storage_options: dict | None = None):
        root, version = parse_url(url)
        if version is not None:
            raise StoreError(f"PairStore takes a root URL without @v{version}; pass version= to manifest()/get()")
        self.url = root
        self._storage_options = dict(storage_options or {})
        self._fs, self.root = filesystem(root, storage_options)
        self._pid = os.getpid()
        self._manifests: dict[int, Manifest] = {}
        self._committed_names: set[str] = set()
        self._committed_upto = 0
        self._index_cache: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # Async filesystems (s3fs) are not fork-safe: a forked DataLoader worker gets its own.
        if os.getpid() != self._pid:
            self._fs, _ = filesystem(self.url, {**self._storage_options, "skip_instance_cache": True})
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        # Shipped to DataLoader workers: drop the lock and caches, keep the filesystem.
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_index_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PairStore({self.url!r})"

    # -- paths ------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _tar_path(self, name: str) -> str:
        return self._p("shards", f"{name}.tar")

    def _index_path(self, name: str) -> str:
        return self._p("index", f"{name}.parquet")

    def _version_path(self, v: int) -> str:
        return self._p("versions", f"v{v:06d}.json")

    def shard_url(self, name: str) -> str:
        return f"{self.url}/shards/{name}.tar"

    @staticmethod
    def shard_name(i: int) -> str:
        return f"shard-{int(i):06d}"

    # -- fingerprint ------------------------------------------------------------------------
    def read_fingerprint(self) -> dict | None:
        try:
            data = self.fs.cat_file(self._p("fingerprint.json"))
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{self.url}/fingerprint.json is not valid JSON ({exc})") from exc

    def ensure_fingerprint(self, fp: dict) -> None:
        """Create the root's fingerprint on first use; afterwards insist on the same one."""
        check_no_credentials(fp, f"fingerprint for {self.url}")
        data = (json.dumps(fp, indent=1, sort_keys=True) + "\n").encode()
        try:
            atomic.create_exclusive(self.fs, self._p("fingerprint.json"), data)
            return
        except FileExistsError:
            pass
        stored = self.read_fingerprint()
        # Compare through JSON so tuples vs lists and int keys do not count as differences.
        requested = json.loads(data)
        diffs = fingerprint_diff(stored, requested)
        if diffs:
            raise FingerprintMismatch(
                f"{self.url} was generated with a different fingerprint; use a new root or the same settings. "
                f"Differences: " + "; ".join(diffs)
            )

    # -- shards -----------------------------------------------------------------------------
    def _read_index_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._index_path(name))
        except FileNotFoundError:
            return None

    def _info_from_index(self, name: str, data: bytes, tar_size: int | None) -> tuple[ShardInfo, Schema] | None:
        try:
            meta = index.read_meta(data, f"{self.url}/index/{name}.parquet")
        except StoreError:
            return None
        if tar_size is None or int(meta["tar_bytes"]) != tar_size:
            return None
        info = ShardInfo(
            name=name,
            num_samples=int(meta["num_samples"]),
            first_index=int(meta.get("first_index", 0)),
            tar_bytes=int(meta["tar_bytes"]),
            tar_xxh3=meta["tar_xxh3"],
            index_bytes=len(data),
            index_xxh3=xxhash.xxh3_64_hexdigest(data),
        )
        return info, Schema.from_dict(json.loads(meta["schema"]))

    def _tar_size(self, name: str) -> int | None:
        try:
            return int(self.fs.info(self._tar_path(name))["size"])
        except FileNotFoundError:
            return None

    def shard_info(self, name: str) -> ShardInfo | None:
        """The shard's record if it is complete (tar present and matching its index), else None."""
        data = self._read_index_bytes(name)
        if data is None:
            return None
        got = self._info_from_index(name, data, self._tar_size(name))
        return None if got is None else got[0]

    def _list(self, sub: str) -> dict[str, int]:
        """basename -> size for one directory, in one listing call."""
        path = self._p(sub)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}

    def complete_shards(self) -> dict[str, ShardInfo]:
        """Every complete shard on storage, committed or not (two listings plus the index files)."""
        tars = {n[: -len(".tar")]: s for n, s in self._list("shards").items() if n.endswith(".tar") and not n.startswith(".")}
        names = sorted(
            n[: -len(".parquet")] for n in self._list("index") if n.endswith(".parquet") and not n.startswith(".")
        )
        names = [n for n in names if n in tars]
        if not names:
            return {}
        paths = [self._index_path(n) for n in names]
        blobs = self.fs.cat(paths, on_error="return")
        out: dict[str, ShardInfo] = {}
        for n, p in zip(names, paths, strict=True):
            data = blobs.get(p) if isinstance(blobs, dict) else None
            if not isinstance(data, bytes):
                continue
            got = self._info_from_index(n, data, tars[n])
            if got is not None:
                out[n] = got[0]
        return out

    def _committed_shard_names(self) -> set[str]:
        # Manifests are immutable, so only versions newer than the last look need reading.
        with self._lock:
            for v in self.versions():
                if v > self._committed_upto:
                    self._committed_names.update(s.name for s in self.manifest(v).shards)
            self._committed_upto = max([self._committed_upto, *self.versions()])
            return set(self._committed_names)

    def _prepare_shard_write(self, name: str) -> None:
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise StoreError(f"bad shard name {name!r}: letters, digits, '-' and '_' only")
        if name in self._committed_shard_names():
            raise StoreError(
                f"shard {name} is part of a committed version of {self.url}; committed shards are immutable, write a new shard name"
            )
        # Drop a stale index first: if we crash mid-write, the old index must not vouch for a new tar.
        try:
            self.fs.rm_file(self._index_path(name))
        except FileNotFoundError:
            pass
        self._index_cache.pop(name, None)

    def open_shard_writer(self, name: str, schema: Schema):
        from .writer import ShardWriter

        if not isinstance(schema, Schema):
            raise StoreError(f"open_shard_writer({name!r}): schema must be a store.Schema, got {type(schema).__name__}")
        return ShardWriter(self, name, schema)

    # -- versions ---------------------------------------------------------------------------
    def versions(self) -> list[int]:
        out = []
        for n in self._list("versions"):
            m = _VERSION_FILE.match(n)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def manifest(self, version: int | None = None) -> Manifest:
        if version is None:
            version = self.latest_version()
            if version is None:
                exists = self.fs.exists(self.root)
                raise StoreError(
                    f"{self.url}: no committed versions"
                    + ("" if exists else " (the root does not exist)")
                    + "; existing versions: none"
                )
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        path = self._version_path(version)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            existing = self.versions()
            listed = ", ".join(f"v{v}" for v in existing) or "none"
            raise StoreError(f"{self.url}@v{version}: no such version; existing versions: {listed}") from None
        m = Manifest.from_json(data, f"{self.url}/versions/v{version:06d}.json")
        if m.version != version:
            raise StoreError(f"{self.url}/versions/v{version:06d}.json says it is version {m.version}")
        self._manifests[version] = m
        return m

    def commit(self, shards: list[ShardInfo], parent: int | None, extra: dict | None = None) -> Manifest:
        """Create version (parent or 0) + 1 listing exactly `shards`. Exclusive: a concurrent
        committer of the same version gets VersionConflict and nothing is overwritten."""
        if not shards:
            raise StoreError(f"{self.url}: nothing to commit (no shards)")
        names = [s.name for s in shards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StoreError(f"{self.url}: shard(s) listed twice in commit: {dup}")
        extra = dict(extra or {})
        check_no_credentials(extra, f"commit extra for {self.url}")
        fp = self.read_fingerprint()
        if fp is None:
            raise StoreError(f"{self.url}: no fingerprint.json; call ensure_fingerprint() before committing")
        parent_m = self.manifest(parent) if parent is not None else None
        known = {s.name: s for s in parent_m.shards} if parent_m else {}
        schema = parent_m.schema if parent_m else None
        new = [s for s in shards if known.get(s.name) != s]
        if new:
            tars = self._list("shards")
            paths = [self._index_path(s.name) for s in new]
            blobs = self.fs.cat(paths, on_error="return")
            for s, p in zip(new, paths, strict=True):
                data = blobs.get(p)
                if not isinstance(data, bytes):
                    raise StoreError(f"cannot commit shard {s.name}: its index {self.url}/index/{s.name}.parquet is missing")
                got = self._info_from_index(s.name, data, tars.get(f"{s.name}.tar"))
                if got is None:
                    raise StoreError(f"cannot commit shard {s.name}: incomplete (tar missing or not matching its index)")
                info, sch = got
                if info != s:
                    raise StoreError(f"cannot commit shard {s.name}: its record {s} does not match storage {info}")
                if schema is None:
                    schema = sch
                elif sch != schema:
                    raise StoreError(
                        f"cannot commit shard {s.name}: its schema {sch.to_dict()} differs from {schema.to_dict()}"
                    )
        version = (parent or 0) + 1
        m = Manifest(
            version=version,
            parent=parent,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            toolkit_version=toolkit_version(),
            fingerprint=fp,
            schema=schema,
            shards=tuple(sorted(shards, key=lambda s: s.name)),
            extra=extra,
        )
        try:
            atomic.create_exclusive(self.fs, self._version_path(version), m.to_json())
        except FileExistsError:
            raise VersionConflict(
                f"{self.url}: version v{version} was committed by another writer first; "
                f"reload the latest version (v{self.latest_version()}) and retry your commit on top of it"
            ) from None
        self._manifests[version] = m
        return m

    # -- random access ----------------------------------------------------------------------
    def _shard_index(self, name: str, where_url: str | None = None):
        """The decoded index of one shard (cached), as a ShardIndex."""
        from .reading import ShardIndex

        cached = self._index_cache.get(name)
        if cached is None:
            data = self._read_index_bytes(name)
            if data is None:
                from .errors import CorruptShardError

                raise CorruptShardError(name, self.shard_url(name), "index file missing")
            cached = ShardIndex.from_bytes(name, data, f"{self.url}/index/{name}.parquet")
            if len(self._index_cache) > 64:
                self._index_cache.pop(next(iter(self._index_cache)))
            self._index_cache[name] = cached
        return cached

    def get(self, index: int | None = None, key: str | None = None, version: int | None = None, fields=None) -> dict:
        """One sample by global index or key, through the index offsets and byte-range reads."""
        from .reading import read_samples

        if (index is None) == (key is None):
            raise StoreError("get() needs exactly one of index= or key=")
        m = self.manifest(version)
        from .reading import META_FIELDS

        fields = [*m.schema.names, "prompt", "seed"] if fields is None else list(fields)
        unknown = [f for f in fields if f not in m.schema.fields and f not in META_FIELDS]
        if unknown:
            raise StoreError(f"unknown field(s) {unknown}; this dataset has {m.schema.names} plus {list(META_FIELDS)}")
        found = self._locate(m, index, key)
        if found is None:
            what = f"index {index}" if key is None else f"key {key!r}"
            raise StoreError(f"{self.url}@v{m.version}: no sample with {what}")
        shard, row = found
        sidx = self._shard_index(shard.name)
        [sample] = read_samples(self.fs, self._tar_path(shard.name), self.shard_url(shard.name), sidx, [row], fields, m.schema)
        sample["shard"] = shard.name
        return sample

    def _locate(self, m: Manifest, index: int | None, key: str | None) -> tuple[ShardInfo, int] | None:
        shards = sorted(m.shards, key=lambda s: s.first_index)
        if key is None:
            # Indices are contiguous per shard in pairgen's layout: try the shard the index falls in first.
            starts = [s.first_index for s in shards]
            i = bisect.bisect_right(starts, index) - 1
            order = ([shards[i]] if i >= 0 else []) + [s for j, s in enumerate(shards) if j != i]
            for s in order:
                row = self._shard_index(s.name).row_of_index(index)
                if row is not None:
                    return s, row
            return None
        if key.isdigit():  # default keys are the zero-padded index
            hit = self._locate(m, int(key), None)
            if hit is not None and self._shard_index(hit[0].name).keys[hit[1]] == key:
                return hit
        for s in shards:
            row = self._shard_index(s.name).row_of_key(key)
            if row is not None:
                return s, row
        return None
