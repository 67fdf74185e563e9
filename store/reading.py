"""Reading samples out of a shard through its index: one byte-range request covering the rows
wanted, per-member xxh3 checks, and zero-copy decoding of .npy payloads into torch tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import xxhash

from . import index as index_mod
from .errors import CorruptShardError, StorageUnavailableError, StoreError, transient_as_unavailable
from .schema import BF16, INDEX, JSON, KEY, META_FIELDS, PROMPT, SEED, Schema, parse_npy_header
from .url import is_local


def torch_dtype(name: str):
    """The torch dtype of one of our dtype names (see schema.dtype_name)."""
    import torch  # lazily: the CLI and random-index lookups never need torch

    if name == BF16:
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype=np.dtype(name))).dtype


@dataclass
class ShardIndex:
    """One shard's index, decoded into columns, one entry per row (sample) in tar order.

    Attributes:
        name: the shard name.
        keys, indices, prompts, seeds: each row's key, global index, prompt and seed.
        offsets, sizes, hashes: member name (index.members) -> each row's data offset in the tar,
            data size, and xxh3 hex digest of that member.
    """

    name: str
    keys: list[str]
    indices: np.ndarray
    prompts: list[str]
    seeds: np.ndarray
    offsets: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    hashes: dict[str, list[str]]
    _by_index: dict | None = field(default=None, repr=False)
    _by_key: dict | None = field(default=None, repr=False)

    @classmethod
    def from_bytes(cls, name: str, data: bytes, where: str) -> ShardIndex:
        """Decode shard `name`'s index file bytes; `where` names the file in errors."""
        meta = index_mod.read_meta(data, where)
        schema = Schema.from_dict(json.loads(meta["schema"]))
        t = index_mod.read_table(data, where)
        try:
            members = index_mod.members(schema)
            return cls(
                name=name,
                keys=t.column(KEY).to_pylist(),
                indices=t.column(INDEX).to_numpy(),
                prompts=t.column(PROMPT).to_pylist(),
                seeds=t.column(SEED).to_numpy(),
                offsets={m: t.column(index_mod.offset_column(m)).to_numpy() for m in members},
                sizes={m: t.column(index_mod.size_column(m)).to_numpy() for m in members},
                hashes={m: t.column(index_mod.hash_column(m)).to_pylist() for m in members},
            )
        except KeyError as exc:
            raise StoreError(f"{where}: index lacks column {exc}") from exc

    def __len__(self) -> int:
        return len(self.keys)

    def row_of_index(self, idx: int) -> int | None:
        """The row holding global index `idx`, or None."""
        if self._by_index is None:
            self._by_index = {int(v): i for i, v in enumerate(self.indices)}
        return self._by_index.get(int(idx))

    def row_of_key(self, key: str) -> int | None:
        """The row holding sample key `key`, or None."""
        if self._by_key is None:
            self._by_key = {k: i for i, k in enumerate(self.keys)}
        return self._by_key.get(key)

    def byte_range(self, rows: list[int], members: list[str]) -> tuple[int, int]:
        """The tar bytes [start, end) holding `members` of all `rows` (the rows between them too)."""
        lo, hi = min(rows), max(rows)
        start = min(int(self.offsets[m][lo]) for m in members)
        end = max(int(self.offsets[m][hi] + self.sizes[m][hi]) for m in members)
        return start, end


def array_members(fields: list[str]) -> list[str]:
    """The .npy members among requested `fields` (the rest come from the index or the record)."""
    return [f for f in fields if f not in META_FIELDS]


def fetched_members(fields: list[str]) -> list[str]:
    """The tar members a read of `fields` fetches and checks: the arrays and, if asked for, the
    json record. A read of index-only fields (prompt, seed) still fetches the json record, so every
    sample read is checked against its hash and exists in the tar."""
    members = array_members(fields) + ([JSON] if JSON in fields else [])
    return members or [JSON]


def fetch_range(fs, path: str, url: str, shard: str, start: int, end: int):
    """Bytes [start, end) of a shard's tar, as a writable 1-D byte buffer (bytearray or uint8
    array) that tensors can share. CorruptShardError if the tar is missing or too short;
    StorageUnavailableError if the storage kept failing through the client's retries."""
    if is_local(fs):
        return _read_local(path, url, shard, start, end)
    try:
        # The client has retried what can be retried by now. A service or network failure says
        # nothing about the shard: reporting it as corrupt would make on_corrupt="skip" drop good
        # samples for the rest of the epoch.
        with transient_as_unavailable(f"reading shard {shard} ({url})"):
            data = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise CorruptShardError(shard, url, "tar file missing") from None
    except StorageUnavailableError:
        raise
    except OSError as exc:
        raise CorruptShardError(shard, url, f"read failed: {exc}") from exc
    if len(data) != end - start:
        raise CorruptShardError(shard, url, f"truncated: wanted bytes {start}-{end}, got {len(data)}")
    return bytearray(data)


def _read_local(path: str, url: str, shard: str, start: int, end: int) -> np.ndarray:
    # Straight into the buffer the tensors will share: no intermediate bytes object to copy, and
    # np.empty rather than bytearray so 25 MB chunks are not zero-filled first.
    buf = np.empty(end - start, dtype=np.uint8)
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            view = memoryview(buf).cast("B")
            got = 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise CorruptShardError(shard, url, "tar file missing") from None
    except OSError as exc:
        raise CorruptShardError(shard, url, f"read failed: {exc}") from exc
    if got != len(buf):
        raise CorruptShardError(shard, url, f"truncated: wanted bytes {start}-{end}, got {got}")
    return buf


class Decoder:
    """Turns .npy member bytes into tensors; parses each field's header once and then only
    compares header bytes, which is all a fixed-shape field ever needs."""

    def __init__(self, schema: Schema):
        """Decode the fields of `schema`."""
        self.schema = schema
        self._headers: dict[str, tuple] = {}

    def decode(self, fieldname: str, buf: bytearray, off: int, size: int, where: str):
        """The tensor in `buf[off : off + size]` (an .npy blob of field `fieldname`), sharing the
        buffer's memory; StoreError naming `where` if it does not match the schema."""
        import torch

        cached = self._headers.get(fieldname)
        if cached is None or memoryview(buf)[off : off + len(cached[0])] != cached[0]:
            cached = self._parse(fieldname, buf, off, size, where)
        hdr, dtype, shape, count, nbytes = cached
        if size - len(hdr) != nbytes:
            raise StoreError(f"{where}: .npy payload is {size - len(hdr)} bytes, expected {list(shape)} x {dtype}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=off + len(hdr)).view(shape)

    def _parse(self, fieldname: str, buf: bytearray, off: int, size: int, where: str) -> tuple:
        try:
            hlen, np_dtype, shape = parse_npy_header(memoryview(buf)[off : off + min(size, 4096)])
        except (StoreError, ValueError) as exc:
            raise StoreError(f"{where}: bad .npy header ({exc})") from exc
        spec = self.schema.fields[fieldname]
        if np_dtype != spec.storage_dtype():
            raise StoreError(f"{where}: stored dtype {np_dtype} does not match the schema's {spec.dtype}")
        count = int(np.prod(shape)) if shape else 1
        cached = (bytes(memoryview(buf)[off : off + hlen]), torch_dtype(spec.dtype), shape, count, count * np_dtype.itemsize)
        self._headers[fieldname] = cached
        return cached


def hash_failures(buf, base: int, sidx: ShardIndex, rows: list[int], members: list[str]) -> dict[int, str]:
    """{position in rows: member} for every row whose member bytes do not match the index's xxh3.

    Kept apart from decoding so the streaming reader can run it on its read-ahead threads right
    after the fetch: xxhash releases the GIL, so checking overlaps the consumer's decoding."""
    mv = memoryview(buf)
    failed: dict[int, str] = {}
    for j, r in enumerate(rows):
        for m in members:
            off = int(sidx.offsets[m][r]) - base
            if xxhash.xxh3_64_hexdigest(mv[off : off + int(sidx.sizes[m][r])]) != sidx.hashes[m][r]:
                failed[j] = m
                break
    return failed


def decode_rows(
    buf: bytearray,
    base: int,
    sidx: ShardIndex,
    rows: list[int],
    fields: list[str],
    decoder: Decoder,
    url: str,
    failed: dict[int, str] | None = None,
    bad: list | None = None,
) -> list[dict | None]:
    """Samples for `rows` from a buffer holding tar bytes [base, base+len(buf)). `failed` is
    hash_failures' result (None: not checked). A sample that fails its checks raises
    CorruptShardError, or, when `bad` is a list, is appended to it as (position in rows, error)
    and comes back as None."""
    arrays = array_members(fields)
    members = arrays + ([JSON] if JSON in fields else [])
    out: list[dict | None] = []
    mv = memoryview(buf)
    for j, r in enumerate(rows):
        try:
            if failed and j in failed:
                raise CorruptShardError(sidx.name, url, f"xxh3 mismatch in member {sidx.keys[r]}.{failed[j]}")
            out.append(_decode_row(mv, buf, base, sidx, r, fields, members, decoder, url))
        except CorruptShardError as exc:
            if bad is None:
                raise
            bad.append((j, exc))
            out.append(None)
    return out


def _decode_row(mv, buf, base, sidx, r, fields, members, decoder, url) -> dict:
    sample: dict = {INDEX: int(sidx.indices[r]), KEY: sidx.keys[r]}
    for m in members:
        off = int(sidx.offsets[m][r]) - base
        size = int(sidx.sizes[m][r])
        if m == JSON:
            sample[JSON] = bytes(mv[off : off + size]).decode()
        else:
            try:
                sample[m] = decoder.decode(m, buf, off, size, f"key {sidx.keys[r]!r}, field {m!r}")
            except StoreError as exc:
                raise CorruptShardError(sidx.name, url, str(exc)) from exc
    if PROMPT in fields:
        sample[PROMPT] = sidx.prompts[r]
    if SEED in fields:
        sample[SEED] = int(sidx.seeds[r])
    return sample


def read_samples(fs, path: str, url: str, sidx: ShardIndex, rows: list[int], fields: list[str], schema: Schema,
                 verify: bool = True, decoder: Decoder | None = None) -> list[dict]:
    """Samples for `rows` of one shard in one byte-range read of the tar at `path` on `fs`;
    CorruptShardError (naming `url`) if anything fails its checks."""
    members = fetched_members(fields)
    start, end = sidx.byte_range(rows, members)
    buf = fetch_range(fs, path, url, sidx.name, start, end)
    failed = hash_failures(buf, start, sidx, rows, members) if verify else None
    return decode_rows(buf, start, sidx, rows, fields, decoder or Decoder(schema), url, failed)
