"""Quiet by default, loud on request: what d2g's commands (and their Ray workers) show of third-party
libraries. Normal runs show our own progress and one-line results; `-v` shows everything the
libraries say (deprecations, processor fallbacks, loading bars), which is what a bug report needs."""

from __future__ import annotations

import logging
import os
import warnings

# Messages from libraries that say nothing actionable to a d2g user; shown again with -v.
_NOISY_WARNINGS = (
    (FutureWarning, r".*"),
    (UserWarning, r".*torchvision.*"),
    (UserWarning, r".*local_dir_use_symlinks.*"),
    (DeprecationWarning, r".*"),
)
_NOISY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "urllib3", "botocore", "aiobotocore", "s3fs",
                  "fsspec", "ray", "filelock")
VERBOSE_ENV = "D2G_VERBOSE"  # inherited by Ray workers, so actors follow the driver's -v


def is_verbose() -> bool:
    """Whether this process (a CLI, or a Ray worker that inherited the driver's environment) runs
    with -v: the D2G_VERBOSE environment variable that `setup_cli_output` sets."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party(verbose: bool | None = None) -> None:
    """Silence library chatter unless verbose (default: the D2G_VERBOSE environment variable).
    Idempotent; call once per process (the CLI's main, each Ray actor's constructor)."""
    if verbose is None:
        verbose = is_verbose()
    if verbose:
        return
    for category, message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def setup_cli_output(verbose: bool) -> None:
    """For a CLI's main: quiet libraries unless verbose, here and in every Ray worker it starts
    (workers read D2G_VERBOSE, which local Ray workers inherit and cluster jobs get in runtime_env)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    quiet_third_party(verbose)


def worker_env() -> dict[str, str]:
    """Environment variables a Ray actor or training worker needs to follow the driver's -v."""
    return {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0")}
