"""What every ``moesim-*`` command of the real backend shares: bad input is one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from workloads.validation import ConfigError

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A command-line usage error (argparse's), reported in one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a command's ``body``; usage errors and ConfigErrors print ``PROG: error: ...`` (one line)
    and return 2, ``--help`` returns 0."""
    try:
        return body()
    except UsageError as exc:
        msg = str(exc)
    except ConfigError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT
