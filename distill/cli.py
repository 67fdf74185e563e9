"""`distill`: train, export, generate and evaluate one-step students; train latent perceptual losses.

Each subsystem registers its own subcommands (a module with `register(subparsers)`), so this
file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with a `register(subparsers)`; a missing one is skipped so partial installs still run.
SUBCOMMAND_MODULES = [
    "distill.commands",
    "distill.evaluate",
    "distill.upscale",
    "distill.lpips.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The `distill` argument parser with every available subsystem's subcommands."""
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Train one- to four-step students from a pair store (Diffusion2GAN `d2g`, ADD `add`, LADD `ladd`, or "
        "plain `regression`), export them as diffusers pipelines, generate and evaluate; "
        "train E-LatentLPIPS for new latent spaces.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `distill`; exit codes and output conventions as in store.console."""
    from d2g.cli.quiet import setup_cli_output
    from d2g.cli.ray_start import RayAddressError
    from d2g.teacher.loading import TeacherError
    from distill.checkpoint import CheckpointError
    from distill.eval_config import EvalConfigError
    from distill.eval_metrics import MetricsError
    from distill.eval_run import EvalError
    from distill.lpips.checkpoints import CheckpointError as LPIPSFileError
    from distill.objectives import ObjectiveError
    from distill.train_config import TrainConfigError
    from distill.trainer import TrainingStopped
    from distill.upscale import UpscaleError
    from store import StoreError, console

    expected = (TrainConfigError, ObjectiveError, TeacherError, StoreError, CheckpointError, LPIPSFileError,
                TrainingStopped, RayAddressError, EvalConfigError, EvalError, MetricsError,
                UpscaleError)
    parser = build_parser()
    console.add_verbosity_flags(parser)
    return console.run_command(parser, argv, expected,
                               "interrupted; re-run the same command to resume from the latest checkpoint",
                               setup=setup_cli_output)


if __name__ == "__main__":
    sys.exit(main())
