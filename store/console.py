"""The command-line conventions every d2g CLI follows (`store`, `pairgen`, `distill`).

They live here, in the package the others build on, so all three behave the same:
- exit 0 on success; 1 when a check ran and found problems (`store verify`); 2 for a usage error or
  an expected failure (bad option, missing file, damaged data, bad teacher), printed as one line
  `PROG: error: ...` naming the file, shard, flag or key; 130 on Ctrl-C.
- no subcommand: the help on stderr and exit 2, like any other usage error.
- `--json`: the result as JSON on stdout (indent 2), messages on stderr.
- `-v` shows tracebacks and everything libraries say; `-q` shows only errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OUR_LOGGERS = ("store", "pairgen", "distill", "d2g")
JSON_HELP = "print the result as JSON on stdout (messages stay on stderr)"


def print_json(value) -> None:
    """`value` as JSON on stdout, in the one style all d2g CLIs use."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The `--json` flag, with the same help text everywhere."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose (tracebacks, library messages, debug logs) and -q/--quiet (errors only), on the
    parser and on each of its subcommands, so they work before or after the subcommand's name."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for target, default in [(parser, False)] + [(sp, argparse.SUPPRESS) for a in subparsers
                                                for sp in a.choices.values()]:
        group = target.add_mutually_exclusive_group()
        group.add_argument("-v", "--verbose", action="store_true", default=default,
                           help="show tracebacks, library warnings and debug messages")
        group.add_argument("-q", "--quiet", action="store_true", default=default, help="show only errors")


def describe_os_error(err: OSError) -> str:
    """One line for a filesystem error: what failed and on which path."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename is not None:
        target = f" ({err.filename2})" if getattr(err, "filename2", None) else ""
        return f"{reason}: {err.filename}{target}"
    return reason


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None,
                expected: tuple[type[BaseException], ...], interrupted: str = "interrupted",
                setup: Callable[[bool], None] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand's `func(args)`, and apply the conventions above.

    Args:
        parser: the CLI's parser; subcommands set `func` with `set_defaults`.
        argv: the arguments (None: sys.argv[1:]).
        expected: exception types that are the user's to fix: printed as one line, exit 2.
            OSError (missing file, read-only folder, a file where a folder is needed) always is.
        interrupted: the line printed on Ctrl-C (say what is kept and how to continue).
        setup: called with `verbose` before the command runs (e.g. to quiet libraries).
    """
    args = parser.parse_args(argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    # Our own loggers (named after the CLIs) speak at INFO; libraries only at WARNING, or DEBUG with -v.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if setup is not None:
        setup(verbose)
    try:
        return int(args.func(args) or 0)
    except expected + (OSError,) as err:
        if verbose:
            traceback.print_exc()
        message = describe_os_error(err) if isinstance(err, OSError) and not isinstance(err, expected) else str(err)
        print(f"{parser.prog}: error: {message or type(err).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        # A command that stopped its own work on Ctrl-C may say more precisely what is kept.
        print(f"{parser.prog}: {str(err) or interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
