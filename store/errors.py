"""Exceptions raised by the pair store. All but StorageUnavailableError derive from StoreError so
callers (and the CLI) can catch one type and print one clear line; StorageUnavailableError is an
OSError, because it says nothing about the data: the same call may well succeed later."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class StoreError(Exception):
    """Any problem with a pair store: bad URL, missing version, bad input, unreadable data."""


class VersionConflict(StoreError):
    """Another writer committed the version we tried to create first."""


class FingerprintMismatch(StoreError):
    """The generation settings differ from the ones this dataset root was created with."""


class CorruptShardError(StoreError):
    """A shard's tar or index is missing, truncated, or does not match its recorded hashes."""

    def __init__(self, shard: str, url: str, reason: str):
        """The message names the shard, its tar's URL and the reason.

        Args:
            shard: the shard's name.
            url: the URL of its tar, so the message says which file to look at.
            reason: what is wrong, in words.
        """
        self.shard = shard
        self.url = url
        self.reason = reason
        super().__init__(f"corrupt shard {shard} ({url}): {reason}")


class StorageUnavailableError(OSError):
    """The storage service or the network kept failing (5xx, throttling, dropped connections,
    timeouts) after the client's own retries. Nothing is known to be wrong with the data, so this
    is never reported as a corrupt or damaged shard: run the command again later. Not a
    StoreError, which callers (pairgen) treat as a fact that a retry cannot change."""


# Server-side failures as s3fs translates them: 500 InternalError and 503 SlowDown.
_TRANSIENT_ERRNOS = {getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.ETIMEDOUT, errno.EAGAIN}
# The HTTP stack's own errors for a connection that broke, timed out or ended early, by
# (module, class) so that store needs none of these libraries to recognise them.
_TRANSPORT_ERRORS = {
    ("aiohttp.client_exceptions", "ClientConnectionError"),
    ("aiohttp.client_exceptions", "ClientPayloadError"),
    ("botocore.exceptions", "HTTPClientError"),
    ("botocore.exceptions", "ConnectionError"),
    ("botocore.exceptions", "IncompleteReadError"),
    ("urllib3.exceptions", "ProtocolError"),
    ("http.client", "HTTPException"),
}


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, raised by a storage call, is a failure of the service or the network that
    retrying may cure (see StorageUnavailableError) rather than a fact about the file (missing,
    forbidden, a bad range): a 5xx or 429 answer, a dropped or timed-out connection, a body that
    ended early."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # botocore's error response: on the exception itself, or on its cause once s3fs translated it.
    for source in (exc, exc.__cause__):
        response = getattr(source, "response", None)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        if isinstance(status, int):
            return status >= 500 or status == 429
    if any((c.__module__, c.__qualname__) in _TRANSPORT_ERRORS for c in type(exc).__mro__):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def unavailable(exc: BaseException, what: str) -> StorageUnavailableError:
    """The StorageUnavailableError for transient error `exc` met while `what` (e.g. "reading
    shard-000003 (s3://b/pairs/shards/shard-000003.tar)"); raise it `from exc`."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return StorageUnavailableError(code, f"{what}: the storage kept failing after the client's retries ({reason}); "
                                         "nothing is known to be wrong with the data: run the command again")


@contextlib.contextmanager
def transient_as_unavailable(what: str) -> Iterator[None]:
    """Around a storage call: a transient failure (is_transient) leaves as StorageUnavailableError
    naming `what`; anything else (FileNotFoundError included) leaves unchanged."""
    try:
        yield
    except StorageUnavailableError:
        raise  # already says what failed
    except Exception as exc:
        if is_transient(exc):
            raise unavailable(exc, what) from exc
        raise
