"""Writes that are never seen half-done: exclusive create for commits, write-then-publish for data.

Local disk: write a hidden temp file next to the target, then os.link (exclusive) or os.replace.
Object stores: an object only becomes visible when its upload completes, and fsspec's "xb" mode
sends If-None-Match: * so a second creator is refused by the server itself.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable

import fsspec

from .layout import temp_path
from .url import is_local

# Object stores where an upload only becomes visible once complete, so we can stream in place.
_ATOMIC_UPLOAD = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def _atomic_upload(fs: fsspec.AbstractFileSystem) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in _ATOMIC_UPLOAD for p in protos)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create `path` holding `data`; FileExistsError if it already exists. Never overwrites.

    On an object store the server refuses a second creator (If-None-Match), and a create whose
    response was lost comes back refused when the client re-sends it; the file then holds exactly
    `data`, and that counts as created."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = temp_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and fails if `path` exists, unlike rename
        finally:
            os.unlink(tmp)
        return
    # A file there before we start is someone else's, whatever it holds.
    if fs.exists(path):
        raise FileExistsError(errno.EEXIST, "File exists", path)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        # The create may have succeeded with its response lost (a connection reset): the client
        # re-sends the PUT (botocore's retries; aiohttp itself when the connection drops)
        # and the server answers 412 as it would for another writer's file. The file was absent a
        # moment ago, so one holding exactly our bytes is our own create, done (or a concurrent
        # writer's identical one, which leaves the same result).
        if not _holds(fs, path, data):
            raise


def _holds(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data`."""
    try:
        return fs.size(path) == len(data) and fs.cat_file(path) == data
    except FileNotFoundError:
        return False


def replace(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish `data` at `path` in one step (used for uncommitted shard files only)."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = temp_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    up = StreamingUpload(fs, path)
    up.write(data)
    up.commit()


def write_local_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a local file through `write(tmp)` (torch.save, safetensors' save_file...) with `tmp` a
    hidden temp path, then publish it with os.replace: a crash mid-write leaves the previous file
    intact, never half of one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StreamingUpload:
    """A file written in pieces that appears at `path` only on commit(); abort() leaves nothing."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        """Open the upload; nothing is visible at `path` (on filesystem `fs`) until commit()."""
        self.fs = fs
        self.path = path
        self._local = is_local(fs)
        self._direct = _atomic_upload(fs)
        if self._local:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._tmp = temp_path(path)
            self._f = open(self._tmp, "wb")
        elif self._direct:
            # s3fs uploads parts as its buffer fills (multipart) and completes the object on close.
            self._f = fs.open(path, "wb")
        else:
            # e.g. memory://, which publishes a file as soon as it is opened: write aside, then move.
            self._tmp = temp_path(path)
            self._f = fs.open(self._tmp, "wb")

    def write(self, data) -> None:
        """Append bytes (any buffer) to the file."""
        self._f.write(data)

    def commit(self) -> None:
        """Finish the file and publish it at `path` in one step, replacing any file there."""
        self._f.close()
        if self._local:
            os.replace(self._tmp, self.path)
        elif not self._direct:
            self.fs.mv(self._tmp, self.path)

    def abort(self) -> None:
        """Abandon the upload: nothing appears at `path` and the temp file is removed."""
        if self._local:
            self._f.close()
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            return
        if not self._direct:
            self._f.close()
            try:
                self.fs.rm(self._tmp)
            except FileNotFoundError:
                pass
            return
        self._f.discard()  # s3fs: aborts the multipart upload, so the object never appears
        self._f.closed = True  # keep __del__ from completing the upload we just abandoned
