"""Deterministic tar members: we write the headers ourselves so we know every data offset and the
same samples always give byte-identical tars (mtime 0, uid/gid 0, mode 0644, no user names)."""

from __future__ import annotations

import tarfile

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular-file member `name` of `size` bytes, deterministic."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # GNU format: names over 100 bytes get a longname block instead of an error; offsets stay
    # exact because we take the header's real length.
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def padding(size: int) -> bytes:
    """The zero bytes that pad `size` bytes of member data to a whole tar block."""
    return b"\0" * (-size % BLOCK)
