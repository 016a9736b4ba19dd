"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user's mistake."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input (a file, a flag): its message names what is wrong."""

    exit_code = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line `main`, turning UserError and Ctrl-C into one line on stderr and an exit
    code; argparse's own exit (--help, or a usage error it has printed) becomes its code."""
    try:
        return int(main(argv) or 0)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
