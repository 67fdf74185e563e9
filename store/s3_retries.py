"""Counting the S3 requests that had to be retried in this process, for the commands' summaries.

Two layers retry S3 requests, and both are counted:

- botocore re-sends a request that failed (5xx, SlowDown and other throttling, a dropped
  connection) within one call; the `retry_mode` and `max_attempts` of the standard AWS
  configuration (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS) decide how often. Every request botocore
  creates carries its attempt number, so a `request-created` handler counts each attempt after
  the first;
- s3fs repeats a whole GET whose body broke off after the headers arrived (a connection reset
  mid-body): botocore has returned by then, so it never sees that failure. A wrapper around each
  GetObject body counts the reads that fail that way, each of which s3fs re-issues.

Not counted: aiohttp's own single re-send of an idempotent request (GET, HEAD, PUT, DELETE) whose
connection broke before the answer came; botocore never learns of it.

The handlers are registered on the event system of the s3fs filesystem's botocore client (the
hook botocore documents for extending a client), once per client; `filesystem()` in store.url
does it for every S3 root the store opens, distill's checkpoints too. The count is per process:
pairgen's Ray actors report theirs with each shard, and the driver adds them up; a DataLoader
worker's count stays in that worker.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .errors import is_transient

if TYPE_CHECKING:
    import fsspec

_HANDLER_ID = "d2g-store-count-retried-requests"
_BODY_HANDLER_ID = "d2g-store-count-broken-bodies"

_lock = threading.Lock()
_retried = 0


def retried_requests() -> int:
    """S3 requests retried in this process since it started (both layers, see the module docstring)."""
    with _lock:
        return _retried


def _add(n: int = 1) -> None:
    global _retried
    with _lock:
        _retried += n


def _on_request_created(request: object = None, **kwargs: object) -> None:
    """botocore's `request-created` event: attempt 2 and later are retries of a failed attempt."""
    context = getattr(request, "context", None) or {}
    if context.get("retries", {}).get("attempt", 1) > 1:
        _add()


def _on_get_object(parsed: object = None, **kwargs: object) -> None:
    """botocore's `after-call` event of GetObject: count the body's failed reads."""
    if isinstance(parsed, dict) and "Body" in parsed and not isinstance(parsed["Body"], _CountingBody):
        parsed["Body"] = _CountingBody(parsed["Body"])


def _count_if_retried(exc: Exception) -> None:
    # s3fs re-issues the GET only for transport failures (a connection reset, a body cut short, a
    # timeout); a checksum mismatch, say, is raised at once and is no retry.
    if is_transient(exc):
        _add()


class _CountingBody:
    """An aiobotocore response body whose failed reads are counted (s3fs retries the GET)."""

    def __init__(self, body: object):
        self._body = body

    async def read(self, *args: object, **kwargs: object) -> bytes:
        """The body's read(), counting a failure."""
        try:
            return await self._body.read(*args, **kwargs)
        except Exception as exc:
            _count_if_retried(exc)
            raise

    async def readinto(self, *args: object, **kwargs: object) -> int:
        """The body's readinto(), counting a failure."""
        try:
            return await self._body.readinto(*args, **kwargs)
        except Exception as exc:
            _count_if_retried(exc)
            raise

    async def __aenter__(self) -> _CountingBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._body.__aexit__(*exc)

    def __getattr__(self, name: str) -> object:
        if name == "_body":  # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self._body, name)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether filesystem `fs` is S3 (s3fs, or anything speaking the s3:// protocol)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols))


def count_retries(fs: fsspec.AbstractFileSystem) -> None:
    """Count the retried requests of filesystem `fs` from now on, if it is s3fs (anything else is
    left alone). Idempotent. Creates the filesystem's botocore client if it has none yet, which
    sends nothing to storage."""
    if not is_s3(fs) or getattr(fs, "asynchronous", False):
        return
    try:
        client = getattr(fs, "s3", None)  # s3fs's property: builds the client on first use
    except Exception:
        # A configuration the client refuses: left for the first request to report, as before.
        return
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:
        return
    # unique_id: registering again (the same cached filesystem opened twice) is a no-op.
    events.register("request-created.s3", _on_request_created, unique_id=_HANDLER_ID)
    events.register("after-call.s3.GetObject", _on_get_object, unique_id=_BODY_HANDLER_ID)
