"""Publishing a shard set with one rename, so a reader sees the old set or the new one, never a mix.

`shards/pairs` (the folder users name, DESIGN.md's layout inside it) is a symbolic link to a
versioned folder beside it, `shards/.pairs.v000007/`. A new set is written into a hidden staging
folder beside the old one, renamed to the next version, and published by replacing the link (a
rename, atomic on POSIX). A reader pins the folder once (`pipeline.shards.pin_shard_dir`, which
`load_manifest` does) and takes every path from the pinned version, which stays on disk until the
re-pack after next: the set a reader started on stays whole through one re-pack.

    stage = ShardSetFolder(out)
    stage.check()                      # before any work: --out is not a folder of other files
    staging = stage.staging()          # write the set here, manifest last
    stage.publish(staging)             # rename, swap the link, prune old versions

A crash before the swap leaves the old set and its manifest as they were; the next run removes the
staging folder of a writer that is gone. An `--out` that is a plain folder from before versioning
(holding only a manifest and split folders) becomes the previous version at the first re-pack.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from common.errors import UserError
from pipeline.shards import SPLITS, fsync_dir, process_alive

SET_ENTRIES = {"manifest.json", *SPLITS}      # what a shard set folder holds (hidden entries aside)


class ShardSetFolder:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.parent, self.name = self.out.parent, self.out.name
        self.version_name = re.compile(rf"\.{re.escape(self.name)}\.v(\d+)")
        self.pid_name = re.compile(rf"\.{re.escape(self.name)}\.(?:staging|link)-(\d+)")

    # ---------------------------------------------------------------------------- before the work
    def check(self) -> None:
        """Refuse an --out whose parent cannot take the new set beside the old one, or that is a
        plain folder holding files of another kind (they would move with the old set and be
        removed with it)."""
        if self.out.is_dir() and not os.access(self.parent, os.W_OK | os.X_OK):
            raise UserError(f"--out {self.out}: its folder {self.parent} is not writable (a re-pack writes the "
                            f"new set beside the old one, then swaps it in)")
        if self.out.is_dir() and not self.out.is_symlink():
            foreign = sorted(entry.name for entry in self.out.iterdir()
                             if entry.name not in SET_ENTRIES and not entry.name.startswith("."))
            if foreign:
                raise UserError(f"--out {self.out}: holds files that are not a shard set ({', '.join(foreign[:5])}"
                                f"{', ...' if foreign[5:] else ''}); pack into a new or empty folder")

    def remove_leftovers(self) -> None:
        """Staging folders and links of a writer that is gone (killed mid-pack)."""
        if not self.parent.is_dir():
            return
        for entry in self.parent.iterdir():
            match = self.pid_name.fullmatch(entry.name)
            if match and not process_alive(int(match.group(1))):
                remove(entry)

    def staging(self) -> Path:
        return self.parent / f".{self.name}.staging-{os.getpid()}"

    # ---------------------------------------------------------------------------- publishing
    def publish(self, staging: Path) -> Path:
        """Make the staged set (its manifest written last) the one `out` names: one rename of a
        link. Returns the version folder."""
        previous = self.current_version()
        if self.out.is_dir() and not self.out.is_symlink():          # a folder from before versioning
            previous = self.retire_plain_folder()
        version = self.rename_to_new_version(staging)
        link = self.parent / f".{self.name}.link-{os.getpid()}"
        remove(link)
        os.symlink(version.name, link)          # relative: the shards folder may move as a whole
        os.replace(link, self.out)
        fsync_dir(self.parent)
        self.prune(keep={version.name, previous.name if previous else ""})
        return version

    def current_version(self) -> Path | None:
        if not self.out.is_symlink():
            return None
        target = self.parent / os.readlink(self.out)
        return target if target.parent == self.parent and self.version_name.fullmatch(target.name) else None

    def rename_to_new_version(self, folder: Path) -> Path:
        """Rename `folder` to the next free version name (a concurrent packer may take one first)."""
        while True:
            version = self.parent / f".{self.name}.v{self.next_version():06d}"
            try:
                os.rename(folder, version)
                fsync_dir(self.parent)
                return version
            except OSError:
                if not version.exists():
                    raise

    def next_version(self) -> int:
        numbers = [int(match.group(1)) for entry in self.parent.iterdir()
                   if (match := self.version_name.fullmatch(entry.name))]
        return max(numbers, default=0) + 1

    def retire_plain_folder(self) -> Path | None:
        """A plain --out folder (a set packed before versioning, or empty) gives way to the link:
        its set becomes the previous version, so a reader of it can finish."""
        for entry in self.out.iterdir():
            if entry.name.startswith("."):          # an older packer's staging leftovers
                remove(entry)
        if not any(self.out.iterdir()):
            self.out.rmdir()
            return None
        return self.rename_to_new_version(self.out)

    def prune(self, keep: set[str]) -> None:
        """Every version but the current one and the one it replaced (which a reader may still hold)."""
        for entry in self.parent.iterdir():
            if self.version_name.fullmatch(entry.name) and entry.name not in keep:
                remove(entry)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
