"""Training metrics as JSON lines and TensorBoard events, in the run folder."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time

import fsspec


class MetricsWriter:
    """Lines accumulate in memory and are written at `flush()` (each checkpoint): local runs append
    to RUN/metrics.jsonl; object stores get the whole file rewritten (no appends on S3).
    TensorBoard events go to RUN/tensorboard: written there directly when RUN is local, else written
    to a local folder and copied to RUN/tensorboard at every flush (TensorBoard reads s3:// itself).

    Args:
        run_url: the run folder URL (local or any fsspec URL).
        enabled: False (ranks other than 0) makes logging and flushing no-ops; reading still works.
    """

    def __init__(self, run_url: str, enabled: bool = True):
        self.enabled = enabled
        self.url = run_url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        self.pending: list[str] = []
        self.history: list[str] = []
        self._tb = None
        self._tb_folder: str | None = None
        if enabled:
            self.fs.makedirs(self.root, exist_ok=True)
            if not self.local and self.fs.exists(self._path):
                self.history = self.fs.cat_file(self._path).decode().splitlines(keepends=True)

    @property
    def _path(self) -> str:
        return posixpath.join(self.root, "metrics.jsonl")

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_folder = (os.path.join(self.root, "tensorboard") if self.local
                               else tempfile.mkdtemp(prefix="d2g-tb-"))
            self._tb = SummaryWriter(self._tb_folder)
        return self._tb

    def log(self, step: int, values: dict) -> None:
        """Queue one JSON line {step, time, **values}; numeric values also go to TensorBoard."""
        if not self.enabled:
            return
        self.pending.append(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        try:
            writer = self._tensorboard()
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(key, value, step)
        except ImportError:
            pass

    def write_json(self, name: str, data: dict) -> None:
        """Write RUN/`name` as indented JSON."""
        with self.fs.open(posixpath.join(self.root, name), "w") as f:
            json.dump(data, f, indent=2)

    def read_json(self, name: str) -> dict:
        """Read RUN/`name` as JSON."""
        return json.loads(self.fs.cat_file(posixpath.join(self.root, name)))

    def flush(self) -> None:
        """Write the queued lines to RUN/metrics.jsonl (and flush TensorBoard)."""
        if not self.enabled or not self.pending:
            return
        if self.local:
            with self.fs.open(self._path, "a") as f:
                f.writelines(self.pending)
        else:
            self.history += self.pending
            with self.fs.open(self._path, "w") as f:
                f.writelines(self.history)
        self.pending = []
        if self._tb is not None:
            self._tb.flush()
            if not self.local:
                self.fs.put(self._tb_folder.rstrip("/") + "/", posixpath.join(self.root, "tensorboard"), recursive=True)
