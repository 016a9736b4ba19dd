"""One writer per output folder: an exclusive lock held from before a stage's first look at its
output folder to its last rename, so two runs writing one folder cannot both pass their checks and
mix their outputs (two extractions into one --out both exited 0; the folder held one checkpoint's
shards).

    with FolderLock(out):          # a second writer: UserError naming the holder (pid, host, command)
        ...check out, write, rename...

The lock is flock(2) on a file beside the folder (`.<name>.lock`, so it survives the folder being
replaced, as a re-pack replaces `shards/pairs`): the kernel releases it when its process dies,
however it dies, so a lock left by a killed run is free, and the next run takes it over (it says
so: the file still names the run that was killed). A released lock's file is removed. The lock
belongs to the process that took it: forked children (worker pools, DataLoader workers) close
their copy at once, so a child outliving its parent cannot hold it. In one process the lock is
re-entrant (a command and the function it calls may both take it).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from common.errors import UserError

_held: dict[str, list[int]] = {}             # lock file -> [its descriptor, how many times taken] in this process
_held_guard = threading.Lock()


def lock_path(folder: str | Path) -> Path:
    """`.<name>.lock` beside `folder`, in its parent's real path: every name of one folder (a relative
    path, a link to its parent) gives the same lock file."""
    folder = Path(os.path.abspath(folder))
    return Path(os.path.realpath(folder.parent)) / f".{folder.name}.lock"


def holder_text(fd: int) -> str:
    """Who holds (or last held) the lock, from its file: `pid N on HOST since TIME: COMMAND`."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        return (f"pid {holder['pid']} on {holder['host']} since {holder['started']}: {holder['command']}"
                if isinstance(holder, dict) else "")
    except (OSError, ValueError, KeyError):
        return ""


class FolderLock:
    def __init__(self, folder: str | Path, flag: str = "--out"):
        self.folder, self.flag = Path(folder), flag
        self.path = lock_path(folder)
        self.holding = False

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise UserError naming who holds it."""
        with _held_guard:
            if self.holding:
                return self
            entry = _held.get(str(self.path))
            if entry is not None:                # this process holds it already: re-entrant
                entry[1] += 1
            else:
                _held[str(self.path)] = [self._take(), 1]
            self.holding = True
        return self

    def _take(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{self.flag} {self.folder}: cannot make its folder ({error.strerror or error})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise UserError(f"{self.flag} {self.folder}: cannot make its lock file {self.path} "
                                f"({error.strerror or error})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = holder_text(fd) or "a process that has not yet said who it is"
                os.close(fd)
                raise UserError(f"{self.flag} {self.folder}: another run is writing it ({holder}); wait for it to "
                                f"finish, or write to another {self.flag}") from None
            if self._still_named(fd):
                break
            os.close(fd)                         # the holder removed the file as we opened it: again
        left = holder_text(fd)
        if left:                                 # a holder that released it removes the file: this one was killed
            print(f"note: {self.flag} {self.folder}: taking over the lock left by {left} (that run is gone)",
                  file=sys.stderr)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)[:200]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return fd

    def _still_named(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        with _held_guard:
            if not self.holding:
                return
            self.holding = False
            entry = _held[str(self.path)]
            entry[1] -= 1
            if entry[1]:
                return
            del _held[str(self.path)]
            if self._still_named(entry[0]):      # removed while held: no later taker can hold the old file
                self.path.unlink(missing_ok=True)
            os.close(entry[0])

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _close_in_child() -> None:
    """A forked child does not hold its parent's locks: it closes its copies (without unlocking:
    the lock stays its parent's)."""
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
