"""Shard records and the immutable version manifest (versions/v000003.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import StoreError
from .schema import Schema

FORMAT = "d2g-pairs"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard as a manifest lists it: enough to find and check both of its files.

    Attributes:
        name: the shard name (layout.tar_path / layout.index_path give its files).
        num_samples: rows in its index.
        first_index: the `index` of its first row.
        tar_bytes, tar_xxh3: size and xxh3_64 (16 hex digits) of the whole tar.
        index_bytes, index_xxh3: size and xxh3_64 of the whole index file.
    """

    name: str
    num_samples: int
    first_index: int
    tar_bytes: int
    tar_xxh3: str
    index_bytes: int
    index_xxh3: str

    def to_dict(self) -> dict:
        """The JSON form of one entry of a manifest's `shards`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        """The inverse of to_dict()."""
        return cls(
            name=str(d["name"]),
            num_samples=int(d["num_samples"]),
            first_index=int(d["first_index"]),
            tar_bytes=int(d["tar_bytes"]),
            tar_xxh3=str(d["tar_xxh3"]),
            index_bytes=int(d["index_bytes"]),
            index_xxh3=str(d["index_xxh3"]),
        )


@dataclass(frozen=True)
class Manifest:
    """One committed version (docs/FORMAT.md, section 4).

    Attributes:
        version: its number, N in `versions/v{N:06d}.json`.
        parent: the version it was committed on top of, or None for the first.
        created: UTC commit time, ISO 8601 with a trailing Z.
        toolkit_version: the d2g version that committed it.
        fingerprint: a copy of the root's fingerprint.json.
        schema: the array fields of every shard.
        shards: the complete shard list, sorted by name.
        extra: free-form JSON from the committer.
    """

    version: int
    parent: int | None
    created: str
    toolkit_version: str
    fingerprint: dict
    schema: Schema
    shards: tuple[ShardInfo, ...]
    extra: dict = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        """Samples in the version: the sum of its shards' num_samples."""
        return sum(s.num_samples for s in self.shards)

    @property
    def bytes(self) -> int:
        """Storage the version's files take: the sum of tar_bytes + index_bytes."""
        return sum(s.tar_bytes + s.index_bytes for s in self.shards)

    @property
    def num_shards(self) -> int:
        """The number of shards in the version."""
        return len(self.shards)

    def to_dict(self) -> dict:
        """The manifest's JSON form, with the format name and version and the derived totals."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "toolkit_version": self.toolkit_version,
            "fingerprint": self.fingerprint,
            "schema": self.schema.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
            "num_pairs": self.num_pairs,
            "bytes": self.bytes,
            "extra": self.extra,
        }

    def to_json(self) -> bytes:
        """The bytes of the manifest file: to_dict() as indented JSON with sorted keys."""
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest file; StoreError naming `where` if it is malformed or newer than this
        toolkit supports."""
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{where}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StoreError(f"{where}: not a {FORMAT} manifest (format={d.get('format') if isinstance(d, dict) else None!r})")
        fv = d.get("format_version")
        if not isinstance(fv, int) or fv > FORMAT_VERSION:
            raise StoreError(
                f"{where}: manifest format_version {fv} is newer than this toolkit supports "
                f"(format_version {FORMAT_VERSION}); upgrade d2g to read it"
            )
        try:
            return cls(
                version=int(d["version"]),
                parent=None if d.get("parent") is None else int(d["parent"]),
                created=str(d["created"]),
                toolkit_version=str(d.get("toolkit_version", "")),
                fingerprint=dict(d.get("fingerprint") or {}),
                schema=Schema.from_dict(d["schema"]),
                shards=tuple(ShardInfo.from_dict(s) for s in d["shards"]),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: malformed manifest ({exc!r})") from exc


def fingerprint_diff(stored, requested, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ, each with both values."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[str] = []
        for k in sorted(set(stored) | set(requested), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in stored:
                out.append(f"{path}: stored <absent> vs requested {requested[k]!r}")
            elif k not in requested:
                out.append(f"{path}: stored {stored[k]!r} vs requested <absent>")
            else:
                out.extend(fingerprint_diff(stored[k], requested[k], path))
        return out
    if stored != requested:
        return [f"{prefix or '<root>'}: stored {stored!r} vs requested {requested!r}"]
    return []


_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "private_key")


def check_no_credentials(d, where: str, path: str = "") -> None:
    """Refuse dict keys that look like credentials: manifests are shared and never hold secrets."""
    if isinstance(d, dict):
        for k, v in d.items():
            p = f"{path}.{k}" if path else str(k)
            if any(w in str(k).lower() for w in _SECRET_WORDS):
                raise StoreError(f"{where}: key {p!r} looks like a credential; manifests never store credentials")
            check_no_credentials(v, where, p)
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            check_no_credentials(v, where, f"{path}[{i}]")
