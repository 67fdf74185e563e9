"""Dataset URLs: `ROOT` or `ROOT@vN`, on any fsspec filesystem."""

from __future__ import annotations

import re

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError
from .s3_retries import count_retries

# Anchored at the end so '@' elsewhere in a URL (user@host, bucket names) is never mistaken.
_VERSION_RE = re.compile(r"@v(\d+)$")


def parse_url(url: str) -> tuple[str, int | None]:
    """Split `ROOT@v3` into (`ROOT`, 3); a bare ROOT gives (ROOT, None) meaning the latest."""
    if not isinstance(url, str) or not url:
        raise StoreError(f"dataset URL must be a non-empty string, got {url!r}")
    m = _VERSION_RE.search(url)
    if m is None:
        if re.search(r"@v[^/]*$", url):
            raise StoreError(f"bad version suffix in {url!r}: expected ROOT@vN with N an integer, e.g. ROOT@v3")
        return url.rstrip("/"), None
    version = int(m.group(1))
    if version < 1:
        raise StoreError(f"bad version in {url!r}: versions start at v1")
    return url[: m.start()].rstrip("/"), version


def filesystem(root: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less root path for a dataset root URL."""
    options = dict(storage_options or {})
    if "://" in root and not root.startswith(("file://", "memory://")):
        # Other processes (pairgen actors, other writers) add files under the root all the time;
        # a cached listing would make fresh files look missing (s3fs consults it even in cat()).
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(root, **options)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"cannot open dataset root {root!r}: {exc}") from exc
    count_retries(fs)  # so the commands' summaries can say how many S3 requests were retried
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk, where os-level calls (link, replace, readinto) apply."""
    return isinstance(fs, LocalFileSystem)


def absolute_url(url: str) -> str:
    """A local path made absolute against this process's working directory (`~` expanded); any
    URL with a scheme (s3://, file://, memory://) unchanged. Drivers call this before handing a
    path to Ray workers, whose working directory is not the user's. A `@vN` suffix is kept."""
    if not isinstance(url, str) or not url or "://" in url:
        return url
    import os

    return os.path.abspath(os.path.expanduser(url))
