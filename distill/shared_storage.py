"""Is a run's storage shared? Every Ray Train worker checks at start that it sees the driver's
`--data` and `--out`.

On a multi-node cluster a local path names a different folder on every node: a worker on another
node would train on data that is not there, or write its checkpoints where the driver (and the
next restart, perhaps on yet another node) never looks. So the driver leaves a marker with a token
of this run in `--out` (`leave_marker`), and each worker, before loading anything, reads it back
and opens the pair store (`check_worker_sees`); one that cannot raises SharedStorageError, one line
naming its node, the path and the need for shared storage (S3, NFS).
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec

# In --out while the run is on; the token tells this run's marker from a stale one.
MARKER = ".d2g-shared-storage-check"
SHARED_HINT = ("every node must see --data and --out at the same path: use shared storage (s3://..., or an NFS "
               "mount on every node)")


class SharedStorageError(RuntimeError):
    """A training worker cannot see the run's --data or --out from its node."""


def _marker_path(out_url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(out_url.rstrip("/"))
    return fs, posixpath.join(root, MARKER)


def leave_marker(out_url: str) -> str:
    """Write a fresh token to `out_url`/MARKER (creating the folder) and return it."""
    token = uuid.uuid4().hex
    fs, path = _marker_path(out_url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(token)
    return token


def remove_marker(out_url: str, token: str) -> None:
    """Remove the marker if it is still this run's (best effort: it is only a check's leftover)."""
    try:
        fs, path = _marker_path(out_url)
        if fs.cat_file(path).decode() == token:
            fs.rm_file(path)
    except Exception:  # a marker left behind is harmless; losing the run's result over it is not
        pass


def _node() -> str:
    """This process's node as a person can find it: its IP and (short) Ray node id, when in Ray."""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            return f"node {ray.util.get_node_ip_address()} (node id {node_id[:12]})"
    except Exception:  # naming the node is a courtesy; the path is what matters
        pass
    import socket

    return f"host {socket.gethostname()}"


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "it does not exist there"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_worker_sees(data_url: str, out_url: str, token: str) -> None:
    """Raise SharedStorageError unless this process can open the pair store at `data_url` (a
    committed version) and read this run's marker token from `out_url`."""
    from store import PairStore, parse_url

    root, _ = parse_url(data_url)
    try:
        fs, path = fsspec.core.url_to_fs(root)
        # An object store has no folders to find: only a local path can be told missing up front.
        if "file" in fs.protocol and not fs.exists(path):
            problem = "it does not exist there"
        else:
            found = PairStore(root).latest_version() is not None
            problem = None if found else "no committed pair store version there"
    except Exception as err:  # any failure to read is the finding (missing mount, no credentials, ...)
        problem = _reason(err)
    if problem:
        raise SharedStorageError(f"the training worker on {_node()} cannot read --data {data_url} ({problem}); "
                                 f"{SHARED_HINT}")
    try:
        fs, path = _marker_path(out_url)
        seen = fs.cat_file(path).decode()
        problem = None if seen == token else f"{path} there was written by another run"
    except Exception as err:
        problem = ("the driver's marker file is not there" if isinstance(err, FileNotFoundError)
                   else _reason(err))
    if problem:
        raise SharedStorageError(f"the training worker on {_node()} does not see the driver's --out {out_url} "
                                 f"({problem}); {SHARED_HINT}")
