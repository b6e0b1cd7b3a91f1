"""``moesim-trace``: router-trace tools (import, stats, fit, generate).

Each subcommand lives in ``sim/trace_cmds/NAME.py`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments; returns an exit status). Bad input
raises ``ConfigError`` (or a subclass): it is printed as one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from workloads.validation import ConfigError

SUBCOMMANDS = ("import_", "stats", "fit", "generate")
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesim-trace", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"sim.trace_cmds.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sim.trace_cmds.{name}":
                continue  # not built yet
            raise
        module.register(subs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except ConfigError as exc:
        print(f"moesim-trace: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(status or 0)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
