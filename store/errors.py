"""Exceptions raised by the pair store. All derive from StoreError so callers (and the CLI) can
catch one type and print one clear line."""

from __future__ import annotations


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
