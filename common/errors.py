"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user's mistake."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from common.memory import keep_freed_memory


class UserError(Exception):
    """A problem with the user's input (a file, a flag): its message names what is wrong."""

    exit_code = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line `main`, turning UserError and Ctrl-C into one line on stderr and an exit
    code; argparse's own exit (--help, or a usage error it has printed) becomes its code; a closed
    stdout (a pipe into `head`) ends it quietly. Every command keeps its freed memory
    (common/memory.py: on a CPU, the training step's activations are otherwise faulted in anew each step)."""
    keep_freed_memory()
    try:
        code = int(main(argv) or 0)
        sys.stdout.flush()                   # here, where a closed pipe can still be caught
        return code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (`... | head -1`): nothing more can be said there, so stop
    quietly. stdout now points at /dev/null, or Python's own flush at exit would raise again and
    print a traceback; 141 is what a shell reports for a process SIGPIPE ended (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):           # stdout without a file descriptor (a test's capture)
        pass
    finally:
        os.close(devnull)
    return 141


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be made or written: `path` is a file,
    or the nearest part of it that exists is a file or not writable. Without this check a run
    would train or evaluate for as long as it takes to reach its first write, then fail there."""
    path = Path(path)
    try:
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        is_dir = existing.is_dir()
    except OSError as error:                     # e.g. a parent folder the user may not search
        raise UserError(f"{flag} {path}: cannot be checked ({error.strerror or error})") from None
    if not is_dir:
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise UserError(f"{flag} {path}: {where}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == path else f"would be made in {existing}, which is"
        raise UserError(f"{flag} {path}: {where} not writable")
