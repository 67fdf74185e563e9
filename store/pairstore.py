"""PairStore: one dataset root on any fsspec filesystem (layout in store/layout.py and
docs/FORMAT.md): fingerprint, shard writing, versions and random access."""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import posixpath
import threading
from collections.abc import Iterator
from datetime import datetime, timezone

import fsspec
import xxhash

from . import atomic, index, layout
from .errors import (
    CorruptShardError,
    FingerprintMismatch,
    StoreError,
    VersionConflict,
    is_transient,
    transient_as_unavailable,
    unavailable,
)
from .manifest import Manifest, ShardInfo, check_no_credentials, fingerprint_diff
from .reading import ShardIndex, read_samples
from .schema import META_FIELDS, PROMPT, SEED, SHARD, Schema
from .url import filesystem, parse_url
from .writer import ShardDestination, ShardWriter


def toolkit_version() -> str:
    """The installed d2g version, recorded in each manifest ("unknown" when not installed)."""
    try:
        from importlib.metadata import version

        return version("d2g")
    except Exception:
        return "unknown"


def _raise_if_transient(result: object, what: str) -> None:
    """Raise StorageUnavailableError if `result` (one value of `fs.cat(..., on_error="return")`)
    is a failure of the storage rather than a fact about the file: a shard whose index could not
    be read for a 503 is neither incomplete nor damaged, and must not be redone or reported."""
    if isinstance(result, BaseException) and is_transient(result):
        raise unavailable(result, what) from result


class PairStore:
    """A dataset root. Construction touches nothing on storage.

    Attributes:
        url: the root URL as given, without a trailing '/' (used in messages and shard URLs).
        root: the same root as a path on `fs`, without the protocol.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        """Name a root; nothing is read or written yet.

        Args:
            url: the dataset root: a path, `file://`, `s3://`, `memory://`... without `@vN` (pick
                a version with the `version=` argument of manifest() and get()).
            storage_options: passed to fsspec for this filesystem (endpoint, credentials...).
        """
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
        self._index_cache: dict[str, ShardIndex] = {}
        self._lock = threading.Lock()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem holding the root (re-created after a fork)."""
        # Async filesystems (s3fs) are not fork-safe: a forked DataLoader worker gets its own.
        if os.getpid() != self._pid:
            self._fs, _ = filesystem(self.url, {**self._storage_options, "skip_instance_cache": True})
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        # Shipped to DataLoader workers: drop the lock and the index cache; keep the filesystem and
        # the manifests (immutable, so no worker needs to read them again).
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_index_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PairStore({self.url!r})"

    # -- names ------------------------------------------------------------------------------
    def shard_url(self, name: str) -> str:
        """The URL of shard `name`'s tar (for messages and for plain tools such as webdataset)."""
        return layout.tar_path(self.url, name)

    @staticmethod
    def shard_name(i: int) -> str:
        """The name of shard number `i`, `shard-000012` (layout.shard_name)."""
        return layout.shard_name(i)

    # -- fingerprint ------------------------------------------------------------------------
    def read_fingerprint(self) -> dict | None:
        """The root's fingerprint.json, or None if no writer has created it yet."""
        try:
            data = self.fs.cat_file(layout.fingerprint_path(self.root))
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{layout.fingerprint_path(self.url)} is not valid JSON ({exc})") from exc

    def ensure_fingerprint(self, fp: dict) -> None:
        """Create the root's fingerprint on first use; afterwards insist on the same one.

        Raises FingerprintMismatch listing every differing dotted path, and StoreError for keys
        that look like credentials."""
        check_no_credentials(fp, f"fingerprint for {self.url}")
        data = (json.dumps(fp, indent=1, sort_keys=True) + "\n").encode()
        try:
            atomic.create_exclusive(self.fs, layout.fingerprint_path(self.root), data)
            return
        except FileExistsError:
            pass
        stored = self.read_fingerprint()
        # Compare through JSON so tuples vs lists and int keys do not count as differences.
        requested = json.loads(data)
        diffs = fingerprint_diff(stored, requested)
        if diffs and self._holds_only_fingerprint():
            # A run that failed before its first shard (a bad teacher, a typo) fixed nothing about
            # the dataset: the corrected command may start it over with its own settings.
            atomic.replace(self.fs, layout.fingerprint_path(self.root), data)
            return
        if diffs:
            raise FingerprintMismatch(
                f"{self.url} was generated with a different fingerprint; use a new root or the same settings. "
                f"Differences: " + "; ".join(diffs)
            )

    def _holds_only_fingerprint(self) -> bool:
        """No version, no shard file (tar or index, finished or not): nothing but the fingerprint."""
        if self.versions():
            return False
        return not self._list(layout.shards_dir(self.root)) and not self._list(layout.index_dir(self.root))

    # -- shards -----------------------------------------------------------------------------
    def _read_index_bytes(self, name: str) -> bytes | None:
        where = f"reading the index of shard {name} ({layout.index_path(self.url, name)})"
        try:
            with transient_as_unavailable(where):
                return self.fs.cat_file(layout.index_path(self.root, name))
        except FileNotFoundError:
            return None

    def _info_from_index(self, name: str, data: bytes, tar_size: int | None) -> tuple[ShardInfo, Schema] | None:
        """The record and schema an index vouches for, or None unless it is readable and
        `tar_size` is the size it recorded: a complete shard needs both files to agree."""
        try:
            meta = index.read_meta(data, layout.index_path(self.url, name))
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
            with transient_as_unavailable(f"looking up shard {name} ({self.shard_url(name)})"):
                return int(self.fs.info(layout.tar_path(self.root, name))["size"])
        except FileNotFoundError:
            return None

    def shard_info(self, name: str) -> ShardInfo | None:
        """The shard's record if it is complete (tar present and matching its index), else None."""
        data = self._read_index_bytes(name)
        if data is None:
            return None
        got = self._info_from_index(name, data, self._tar_size(name))
        return None if got is None else got[0]

    def _list(self, path: str) -> dict[str, int]:
        """basename -> size for the files of one directory (a path on fs), in one listing call."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}

    def complete_shards(self) -> dict[str, ShardInfo]:
        """Every complete shard on storage, committed or not (two listings plus the index files)."""
        tars = {}
        for file_name, size in self._list(layout.shards_dir(self.root)).items():
            name = layout.shard_of_tar_file(file_name)
            if name is not None:
                tars[name] = size
        indexed = (layout.shard_of_index_file(f) for f in self._list(layout.index_dir(self.root)))
        names = sorted(n for n in indexed if n is not None and n in tars)
        if not names:
            return {}
        paths = [layout.index_path(self.root, n) for n in names]
        blobs = self.fs.cat(paths, on_error="return")
        out: dict[str, ShardInfo] = {}
        for n, p in zip(names, paths, strict=True):
            data = blobs.get(p) if isinstance(blobs, dict) else None
            _raise_if_transient(data, f"reading the index of shard {n} ({layout.index_path(self.url, n)})")
            if not isinstance(data, bytes):
                continue
            got = self._info_from_index(n, data, tars[n])
            if got is not None:
                out[n] = got[0]
        return out

    def _committed_shard_names(self) -> set[str]:
        # Manifests are immutable, so only versions newer than the last look need reading.
        with self._lock:
            versions = self.versions()
            for v in versions:
                if v > self._committed_upto:
                    self._committed_names.update(s.name for s in self.manifest(v).shards)
            self._committed_upto = max([self._committed_upto, *versions])
            return set(self._committed_names)

    def _claim_shard(self, name: str) -> None:
        """The check a ShardWriter runs before writing shard `name` here (ShardDestination.prepare)."""
        if not layout.is_valid_shard_name(name):
            raise StoreError(f"bad shard name {name!r}: letters, digits, '-' and '_' only")
        if name in self._committed_shard_names():
            raise StoreError(
                f"shard {name} is part of a committed version of {self.url}; committed shards are immutable, write a new shard name"
            )
        # Drop a stale index first: if we crash mid-write, the old index must not vouch for a new tar.
        try:
            self.fs.rm_file(layout.index_path(self.root, name))
        except FileNotFoundError:
            pass
        self._index_cache.pop(name, None)

    def open_shard_writer(self, name: str, schema: Schema) -> ShardWriter:
        """A writer for shard `name`, used as `with store.open_shard_writer(name, schema) as w:`.

        On entering the block the name is checked (StoreError if malformed or part of a committed
        version) and any old index of that name is removed; on a clean exit the tar and then the
        index are published and `w.info` holds the ShardInfo to commit.

        Args:
            name: the shard name, `[A-Za-z0-9][A-Za-z0-9_-]*` (usually layout.shard_name(i)).
            schema: the array fields of every sample.
        """
        if not isinstance(schema, Schema):
            raise StoreError(f"open_shard_writer({name!r}): schema must be a store.Schema, got {type(schema).__name__}")
        destination = ShardDestination.in_root(self.fs, self.root, name, functools.partial(self._claim_shard, name))
        return ShardWriter(destination, name, schema)

    def discard_partial_shard(self, name: str) -> int:
        """Remove the temp files of an unfinished write of shard `name` (its writer was killed, so
        it could not clean up). Only for writers known to be dead: a live writer's file would go too.
        Returns the number of files removed. (An object store keeps no such files: an unfinished
        upload never appears.)"""
        removed = 0
        for folder, target in ((layout.shards_dir(self.root), posixpath.basename(layout.tar_path(self.root, name))),
                               (layout.index_dir(self.root), posixpath.basename(layout.index_path(self.root, name)))):
            for file_name in self._list(folder):
                if layout.is_temp_of(file_name, target):
                    try:
                        self.fs.rm_file(posixpath.join(folder, file_name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def damaged_shards(self, version: int | None = None) -> list[tuple[ShardInfo, str]]:
        """The committed shards of a version (default: the latest) whose files no longer match its
        manifest (missing, truncated, or an index with other contents), each with what is wrong.
        Cheap: two listings and the index files; `verify --deep` also hashes every tar."""
        if self.latest_version() is None:
            return []
        manifest = self.manifest(version)
        complete = self.complete_shards()
        damaged = []
        for expected in manifest.shards:
            found = complete.get(expected.name)
            if found == expected:
                continue
            size = self._tar_size(expected.name)
            if size is None:
                reason = "its tar is missing"
            elif self._read_index_bytes(expected.name) is None:
                reason = "its index is missing"
            elif size != expected.tar_bytes:
                reason = f"its tar is {size} bytes, the manifest says {expected.tar_bytes}"
            else:
                reason = "its index differs from the one committed"
            damaged.append((expected, reason))
        return damaged

    @contextlib.contextmanager
    def repair_shard_writer(self, expected: ShardInfo, schema: Schema) -> Iterator[ShardWriter]:
        """Rewrite a committed shard whose files are damaged, as `with store.repair_shard_writer(info,
        schema) as w:`. The shard is written beside the damaged files and published over them only
        if the result is byte-identical to what the manifest recorded (generation is deterministic),
        so a repair can restore a committed shard but never change one: otherwise StoreError, and
        nothing is replaced.

        Args:
            expected: the shard's record in the manifest.
            schema: the array fields of every sample.
        """
        tar_path = layout.tar_path(self.root, expected.name)
        index_path = layout.index_path(self.root, expected.name)
        staged = ShardDestination(self.fs, layout.temp_path(tar_path), layout.temp_path(index_path))
        writer = ShardWriter(staged, expected.name, schema)
        try:
            with writer:
                yield writer
            if writer.info != expected:
                raise StoreError(
                    f"repair of shard {expected.name} of {self.url} produced other bytes than the committed "
                    f"shard (tar xxh3 {writer.info.tar_xxh3} vs {expected.tar_xxh3}): the settings or the "
                    "teacher are not the ones it was made with; nothing was replaced")
            self.fs.mv(staged.tar_path, tar_path)
            self.fs.mv(staged.index_path, index_path)
            self._index_cache.pop(expected.name, None)
        finally:
            for leftover in (staged.tar_path, staged.index_path):
                try:
                    self.fs.rm_file(leftover)
                except FileNotFoundError:
                    pass

    # -- versions ---------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Every committed version, ascending (one listing of versions/)."""
        found = (layout.version_of_manifest_file(f) for f in self._list(layout.versions_dir(self.root)))
        return sorted(v for v in found if v is not None)

    def latest_version(self) -> int | None:
        """The highest committed version, or None if nothing is committed."""
        vs = self.versions()
        return vs[-1] if vs else None

    def manifest(self, version: int | None = None) -> Manifest:
        """The manifest of `version` (the latest when None); StoreError naming the versions that
        exist if it does not. Manifests are immutable, so each is read once."""
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
        try:
            with transient_as_unavailable(f"reading {layout.manifest_path(self.url, version)}"):
                data = self.fs.cat_file(layout.manifest_path(self.root, version))
        except FileNotFoundError:
            existing = self.versions()
            listed = ", ".join(f"v{v}" for v in existing) or "none"
            raise StoreError(f"{self.url}@v{version}: no such version; existing versions: {listed}") from None
        where = layout.manifest_path(self.url, version)
        m = Manifest.from_json(data, where)
        if m.version != version:
            raise StoreError(f"{where} says it is version {m.version}")
        self._manifests[version] = m
        return m

    def commit(self, shards: list[ShardInfo], parent: int | None, extra: dict | None = None) -> Manifest:
        """Create version (parent or 0) + 1 listing exactly `shards`. Exclusive: a concurrent
        committer of the same version gets VersionConflict and nothing is overwritten.

        Args:
            shards: the complete shard list of the new version (not a delta); shards not in
                `parent` are checked against storage (index hash, tar size, schema).
            parent: the version this one builds on, or None for the first version.
            extra: free-form JSON stored in the manifest; keys that look like credentials are refused.
        """
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
            tars = self._list(layout.shards_dir(self.root))
            paths = [layout.index_path(self.root, s.name) for s in new]
            blobs = self.fs.cat(paths, on_error="return")
            for s, p in zip(new, paths, strict=True):
                data = blobs.get(p)
                _raise_if_transient(data, f"reading the index of shard {s.name} ({layout.index_path(self.url, s.name)})")
                if not isinstance(data, bytes):
                    raise StoreError(
                        f"cannot commit shard {s.name}: its index {layout.index_path(self.url, s.name)} is missing"
                    )
                got = self._info_from_index(s.name, data, tars.get(layout.tar_file(s.name)))
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
            atomic.create_exclusive(self.fs, layout.manifest_path(self.root, version), m.to_json())
        except FileExistsError:
            raise VersionConflict(
                f"{self.url}: version v{version} was committed by another writer first; "
                f"reload the latest version (v{self.latest_version()}) and retry your commit on top of it"
            ) from None
        self._manifests[version] = m
        return m

    # -- random access ----------------------------------------------------------------------
    def shard_index(self, name: str) -> ShardIndex:
        """The decoded index of shard `name` (cached); CorruptShardError if it is missing."""
        cached = self._index_cache.get(name)
        if cached is None:
            data = self._read_index_bytes(name)
            if data is None:
                raise CorruptShardError(name, self.shard_url(name), "index file missing")
            cached = ShardIndex.from_bytes(name, data, layout.index_path(self.url, name))
            if len(self._index_cache) > 64:
                self._index_cache.pop(next(iter(self._index_cache)))
            self._index_cache[name] = cached
        return cached

    def get(self, index: int | None = None, key: str | None = None, version: int | None = None, fields=None) -> dict:
        """One sample by global index or key, through the index offsets and byte-range reads.

        Args:
            index: the sample's global index (give exactly one of index and key).
            key: the sample's key.
            version: the version to look in; the latest when None.
            fields: the fields to read (schema fields and/or "prompt", "seed", "json"); all array
                fields plus prompt and seed when None.

        Returns:
            A dict of the fields (arrays as torch tensors in the stored dtype) plus "index", "key"
            and "shard"; StoreError if no sample matches.
        """
        if (index is None) == (key is None):
            raise StoreError("get() needs exactly one of index= or key=")
        m = self.manifest(version)
        fields = [*m.schema.names, PROMPT, SEED] if fields is None else list(fields)
        unknown = [f for f in fields if f not in m.schema.fields and f not in META_FIELDS]
        if unknown:
            raise StoreError(f"unknown field(s) {unknown}; this dataset has {m.schema.names} plus {list(META_FIELDS)}")
        found = self._locate(m, index, key)
        if found is None:
            what = f"index {index}" if key is None else f"key {key!r}"
            raise StoreError(f"{self.url}@v{m.version}: no sample with {what}")
        shard, row = found
        sidx = self.shard_index(shard.name)
        [sample] = read_samples(self.fs, layout.tar_path(self.root, shard.name), self.shard_url(shard.name), sidx, [row],
                                fields, m.schema)
        sample[SHARD] = shard.name
        return sample

    def _locate(self, m: Manifest, index: int | None, key: str | None) -> tuple[ShardInfo, int] | None:
        shards = sorted(m.shards, key=lambda s: s.first_index)
        if key is None:
            # Indices are contiguous per shard in pairgen's layout: try the shard the index falls in first.
            starts = [s.first_index for s in shards]
            i = bisect.bisect_right(starts, index) - 1
            order = ([shards[i]] if i >= 0 else []) + [s for j, s in enumerate(shards) if j != i]
            for s in order:
                row = self.shard_index(s.name).row_of_index(index)
                if row is not None:
                    return s, row
            return None
        if key.isdigit():  # maybe a default key (layout.default_key): try its index first
            hit = self._locate(m, int(key), None)
            if hit is not None and self.shard_index(hit[0].name).keys[hit[1]] == key:
                return hit
        for s in shards:
            row = self.shard_index(s.name).row_of_key(key)
            if row is not None:
                return s, row
        return None
