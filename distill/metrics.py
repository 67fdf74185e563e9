"""Training metrics as JSON lines and TensorBoard events, in the run folder; and the progress a
person watching the run sees (`ProgressDisplay`)."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import tempfile
import time
from typing import Protocol

import fsspec

logger = logging.getLogger("distill.progress")


class ProgressSink(Protocol):
    """Where a training rank sends its progress: `update` after every step (`log_line` on the
    steps that log metrics), `close` when training ends or fails."""

    def update(self, step: int, rates: dict, logs: dict, log_line: bool) -> None:
        """Training reached `step`; `rates` as Trainer._rates, `logs` the step's losses."""

    def close(self) -> None:
        """No more updates."""


def progress_line(step: int, max_steps: int, rates: dict, logs: dict) -> str:
    """The plain progress line: step, rate, samples/s, ETA and the total losses."""
    per_second = rates["time/steps_per_second"]
    eta = (max_steps - step) / per_second if per_second > 0 else float("inf")
    losses = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.endswith("total"))
    return (f"distill: step {step}/{max_steps} {per_second:.2f} steps/s {rates['time/samples_per_second']:.1f} "
            f"samples/s ETA {eta / 60:.1f} min {losses}").rstrip()


class ProgressDisplay:
    """Training progress, rendered in one process (in-process training's, or the Ray driver's for
    every Ray Train worker): one tqdm bar when `bar` and stderr is a terminal, otherwise a plain line
    on each log step (every `log_every` steps and the last), with rate and ETA.

    The lines go to the `distill.progress` logger, so the CLIs' -q hides them; a program that never
    configured logging (the demo, a notebook) gets them on stderr all the same.

    Args:
        max_steps: the step training ends at.
        desc: the bar's label.
        bar: draw a bar if stderr is a terminal (False: `--no-progress`).
    """

    def __init__(self, max_steps: int, desc: str, bar: bool = True):
        self.max_steps, self.desc = max_steps, desc
        self.bar_wanted = bar and sys.stderr.isatty()
        self._bar = None

    def update(self, step: int, rates: dict, logs: dict, log_line: bool) -> None:
        """Show that training reached `step` (see ProgressSink)."""
        if self.bar_wanted:
            if self._bar is None:
                from tqdm import tqdm

                # Created at the first update, so a resumed run's bar starts at its resume step.
                self._bar = tqdm(total=self.max_steps, initial=step, unit="step", desc=self.desc,
                                 dynamic_ncols=True)
            else:
                # Set, not incremented: updates may be throttled, and a restarted worker group
                # resumes from an earlier checkpoint.
                self._bar.n = step
            if log_line:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("total")}, refresh=False)
            self._bar.refresh()
        elif log_line:
            self.message(progress_line(step, self.max_steps, rates, logs))

    def message(self, text: str, level: int = logging.INFO) -> None:
        """One line for the person watching: through logging when the program configured it
        (the CLIs: -q hides INFO), else on stderr. Printed above a bar that is showing."""
        if self._bar is not None:
            self._bar.clear()
        if logger.hasHandlers():
            logger.log(level, text)
        else:
            print(text, file=sys.stderr, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """Close the bar, if one is showing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
