"""`pairgen`: generate (noise, prompt, teacher latent) pair datasets with Ray, and inspect them."""

from __future__ import annotations

import argparse
import sys

from d2g.cli.json_stdout import stdout_kept_for_json
from d2g.cli.options import add_model_flags, flag_overrides
from d2g.cli.quiet import setup_cli_output
from pairgen.config import ConfigError, GenerationConfig, load_config
from store import console

EXAMPLES = """examples:
  pairgen run --num-pairs 256 --steps 25        # the embedded shapes teacher, local Ray, ./pairs
  pairgen run --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts s3://bucket/coco.txt \\
              --out s3://bucket/pairs/sd15-cfg3 --num-pairs 3000000 --guidance 3 --workers 64
  pairgen run --config jobs/pairgen_sd15_cfg3.yaml --num-pairs 4000000   # extend: commits a new version
  pairgen status s3://bucket/pairs/sd15-cfg3 --json
"""


def build_parser() -> argparse.ArgumentParser:
    """The `pairgen` argument parser: `run` (every GenerationConfig field is a flag) and `status`."""
    parser = argparse.ArgumentParser(
        prog="pairgen",
        description="Run a diffusion teacher's deterministic ODE solver (DDIM eta=0, DPM-Solver++, Euler for "
        "SD1.5/SDXL-style UNets; rectified-flow Euler or Heun for SD3- and FLUX-style transformers) over "
        "many prompts on a Ray cluster and write (noise, prompt, latent) pairs as a versioned, sharded dataset "
        "on any fsspec filesystem (local, s3://). Re-running the same command resumes; a larger --num-pairs "
        "extends the dataset and commits a new version.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="generate (or resume, or extend) a pair dataset",
                         description="Generate pairs. Every option can also come from --config YAML "
                         "(keys are the option names with underscores); flags override the file.")
    run.add_argument("--config", help="YAML file with any of the options below")
    add_model_flags(run, GenerationConfig)
    console.add_json_flag(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="shards done and pending, pairs, last version of a dataset")
    status.add_argument("url", help="dataset root URL")
    console.add_json_flag(status)
    status.set_defaults(func=_cmd_status)

    from pairgen import prompts

    prompts.register(sub)
    console.add_verbosity_flags(parser)
    return parser


def _print_summary(summary: dict) -> None:
    print(f"pairgen: {summary['out']} version v{summary['version']}: {summary['num_pairs']} pairs in "
          f"{summary['num_shards']} shards", file=sys.stderr)
    print(f"  generated {summary['pairs_generated']} pairs in {len(summary['shards_generated'])} shards "
          f"({summary['bytes_written'] / 1e6:.1f} MB) in {summary['seconds']:.1f} s: "
          f"{summary['pairs_per_second']:.1f} pairs/s, {summary['pairs_per_second_per_worker']:.1f} per worker", file=sys.stderr)
    print(f"  reused {summary['shards_reused']} complete shards; retries {summary['retries']}, actors replaced "
          f"{summary['actors_replaced']} (given up {summary['actors_given_up']}, restarted "
          f"{summary['actors_restarted']}), S3 requests retried {summary['s3_retries']}; truncated prompts "
          f"{summary['truncated_prompts']}, empty prompts skipped {summary['empty_prompts_skipped']}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from pairgen.runner import PairgenRun

    config: GenerationConfig = load_config(args.config, flag_overrides(args, GenerationConfig))
    with stdout_kept_for_json(args.json):
        summary = PairgenRun(config, progress=not args.no_progress).run().as_dict()
    if args.json:
        console.print_json(summary)
    _print_summary(summary)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pairgen.status import dataset_status

    status = dataset_status(args.url)
    if args.json:
        console.print_json(status)
    else:
        print(f"{args.url}: last version {status['last_version']}, {status['committed_pairs']} committed pairs "
              f"in {status['committed_shards']} shards")
        print(f"  target {status['target_num_pairs']} pairs: {status['shards_done']} shards done "
              f"({status['shards_uncommitted']} not yet committed), {status['shards_pending']} pending")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `pairgen`; exit codes and output conventions as in store.console."""
    from d2g.cli.ray_start import RayAddressError
    from d2g.teacher.loading import TeacherError
    from pairgen.prompts import PromptSourceError
    from pairgen.runner import RunError
    from store import StoreError

    return console.run_command(build_parser(), argv,
                               (ConfigError, PromptSourceError, TeacherError, StoreError, RunError, RayAddressError),
                               "interrupted; finished shards are kept, re-run the same command to continue",
                               setup=setup_cli_output)


if __name__ == "__main__":
    sys.exit(main())
