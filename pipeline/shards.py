"""Tar shards in webdataset layout: reproducible, atomic writing with a DALI index beside each tar,
reading through that index, manifests, and atomic small-file writes.

Shared by pack.py (pair shards), extract.py (latent shards) and the loaders, so every stage writes
and reads shards the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Sequence

from common.errors import UserError
from pipeline.manifest_schema import (LATENT_SCHEMA, PAIRS_SCHEMA, SPLIT, SchemaError, kind_name, short,
                                      validate)

INDEX_VERSION = "v1.2"      # the format DALI's wds2idx writes and fn.readers.webdataset reads
PAIRS_FORMAT = "lam-pairs/1"      # manifest.json of pair shards (pack.py)
LATENT_FORMAT = "lam-latent/1"    # manifest.json of latent shards (extract.py)
SPLITS = ("train", "val", "test")


def split_member_name(name: str) -> tuple[str, str]:
    """'00003_000012.cur.png' -> ('00003_000012', 'cur.png'): webdataset and DALI split at the first dot."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot <= 0:
        raise ValueError(f"tar member {name!r} has no extension")
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1:]


# --------------------------------------------------------------------------------------- writing
def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A hidden sibling name: never matched by `*.tar` globs, so a half-written file never looks complete."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_orphaned_temps(directory: Path) -> list[Path]:
    """Delete the temp files (`temp_path_for`) in `directory` whose writer is gone: a process killed
    mid-write leaves one behind, invisible to readers but taking disk."""
    removed = []
    for path in Path(directory).glob(".*.tmp-*"):
        pid = path.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, whatever stops this write (a crash, a full disk):
    the bytes go to a hidden temp file, reach the disk (fsync), and only then take the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)          # nothing left behind (a killed writer's: remove_orphaned_temps)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass
class WrittenShard:
    tar: Path
    index: Path
    samples: int
    sha256: str


class TarShardWriter:
    """Writes one webdataset tar byte-for-byte reproducibly (fixed mtime, owner, mode, member order)
    under a temp name, and its `.idx` alongside; `close()` renames both into place (index first,
    tar last), so a crash at any point leaves no tar that looks complete. `before_publish(shard)`,
    if given, runs once the tar is whole on disk and before it gets its name: a completion record
    written there exists before the tar does, so no visible tar ever lacks one.

        with TarShardWriter(Path("out/pairs-000000.tar")) as w:
            w.add("00000_000000", {"cur.png": b"...", "next.png": b"...", "json": b"{...}"})
    """

    def __init__(self, path: Path, before_publish: Callable[[WrittenShard], None] | None = None):
        self.path = Path(path)
        self.before_publish = before_publish
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path_for(self.path)
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._out = _HashingWriter(self._file, self._hash)
        self._offset = 0
        self._index_lines: list[str] = []
        self.samples = 0
        self.result: WrittenShard | None = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dot or slash")
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            header = member_header(name, len(data))
            padding = -len(data) % tarfile.BLOCKSIZE
            self._out.write(header)
            self._out.write(data)
            self._out.write(tarfile.NUL * padding)
            parts.append(f"{ext} {self._offset + len(header)} {len(data)} {name}")
            self._offset += len(header) + len(data) + padding
        self._index_lines.append(" ".join(parts))
        self.samples += 1

    def close(self) -> WrittenShard:
        if self.result is not None:
            return self.result
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index_path = self.path.with_suffix(".idx")
        atomic_write_bytes(index_path, self.index_text().encode())
        written = WrittenShard(self.path, index_path, self.samples, self._hash.hexdigest())
        if self.before_publish is not None:
            try:
                self.before_publish(written)
            except BaseException:
                self._tmp.unlink(missing_ok=True)
                raise
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        self.result = written
        return self.result

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def index_text(self) -> str:
        return f"{INDEX_VERSION} {len(self._index_lines)}\n" + "".join(line + "\n" for line in self._index_lines)

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _blank_header() -> bytearray:
    header = bytearray(_tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    header[148:156] = b" " * 8          # the checksum is summed over the header with this field blank
    return header


_BLANK_HEADER = _blank_header()


def member_header(name: str, size: int) -> bytes:
    """The ustar header tarfile writes for a regular file with mtime 0, mode 0644 and owner 0, built
    from a template: tarfile's generic builder (TarInfo.tobuf) is most of the cost of a small sample."""
    encoded = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(encoded) > 100 or size >= 8 ** 11:      # needs a name prefix or a large size field
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    header = bytearray(_BLANK_HEADER)
    header[:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class _HashingWriter:
    """File wrapper that hashes what passes through, so a shard's sha256 costs no second read."""

    def __init__(self, file, digest):
        self._file, self._digest = file, digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._file.write(data)


# --------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class IndexedSample:
    key: str
    members: dict[str, tuple[int, int]]     # ext -> (byte offset of the data, size)


def read_index(index_path: Path) -> list[IndexedSample]:
    """Parse a `.idx` in wds2idx's v1.2 format (`ext offset size name` per member, one sample a line)."""
    index_path = Path(index_path)
    if not index_path.is_file():
        raise UserError(f"{index_path}: shard index is missing (run `wds2idx` on its tar, or re-pack)")
    lines = index_path.read_text().splitlines()
    try:
        version, count = lines[0].split()
        if version != INDEX_VERSION or int(count) != len(lines) - 1:
            raise ValueError
        samples = []
        for line in lines[1:]:
            fields = line.split()
            members, key = {}, None
            for i in range(0, len(fields), 4):
                ext, offset, size, name = fields[i:i + 4]
                key = split_member_name(name)[0]
                members[ext] = (int(offset), int(size))
            samples.append(IndexedSample(key, members))
    except (ValueError, IndexError):
        raise UserError(f"{index_path}: not a {INDEX_VERSION} webdataset index") from None
    return samples


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class Manifest(dict):
    """A manifest as read: the dict, plus `root`, the folder it was read from (through the link a
    re-pack swaps: see `pin_shard_dir`), so the shard paths taken from it name the very set it
    describes, and `sha256`, the hash of the bytes it was parsed from."""

    root: Path
    sha256: str


SCHEMAS = {PAIRS_FORMAT: PAIRS_SCHEMA, LATENT_FORMAT: LATENT_SCHEMA}


def pin_shard_dir(shard_dir: str | Path) -> Path:
    """The folder `shard_dir` names now. pack.py publishes a shard set by swapping a symlink, so a
    reader that builds every path from the pinned folder reads one set from start to end, whatever
    a re-pack swaps in meanwhile (the set it replaced stays on disk until the next re-pack)."""
    path = Path(shard_dir)
    for _ in range(40):                     # the kernel's own limit on a chain of links
        if not path.is_symlink():
            return path
        path = path.parent / os.readlink(path)
    raise UserError(f"{shard_dir}: too many levels of symbolic links")


def load_manifest(shard_dir: Path, expected_format: str) -> Manifest:
    """Read `<shard_dir>/manifest.json` and check it against its format's schema
    (pipeline/manifest_schema.py): a missing, unreadable or foreign manifest, or one with a field
    wrong or a shard path outside the folder, is one UserError naming the file (and the field)."""
    root = pin_shard_dir(shard_dir)
    path = Path(shard_dir) / "manifest.json"
    if not root.is_dir():
        raise UserError(f"{shard_dir}: shard directory not found")
    try:
        data = (root / "manifest.json").read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found (is {shard_dir} a finished shard directory?)") from None
    except OSError as error:
        raise UserError(f"{path}: unreadable manifest ({error.strerror or error})") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a manifest (not UTF-8 text: the file is damaged or something else)") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path}: unreadable manifest (not JSON: {str(error)[:120]})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (JSON {kind_name(manifest)}, not an object)")
    if manifest.get("format") != expected_format:
        raise UserError(f"{path}: format is {short(manifest.get('format'))}, expected {expected_format!r}")
    try:
        validate(manifest, SCHEMAS[expected_format])
    except SchemaError as error:
        raise UserError(f"{path}: {error}") from None
    loaded = Manifest(manifest)
    loaded.root, loaded.sha256 = root, hashlib.sha256(data).hexdigest()
    return loaded


def manifest_sha256(shard_dir: Path, expected_format: str) -> str:
    """sha256 of a shard directory's manifest.json, once it is checked to be one of `expected_format`:
    how a checkpoint remembers the data it was trained on."""
    return load_manifest(shard_dir, expected_format).sha256


def split_shards(shard_dir: Path, manifest: dict, split: str, *, verify: bool = False) -> list[dict]:
    """The manifest's shard entries for `split`, with `tar`/`idx` resolved to paths that exist, each
    checked against what the manifest promises: its index lists the manifest's number of samples
    and its tar is long enough to hold them (always: a shard cut short, or an index from another
    tar, must not read as a shorter split); with `verify`, its bytes hash to the manifest's
    sha256 (one read of every tar). Paths are taken from the folder the manifest was read from."""
    where = Path(shard_dir) / "manifest.json"
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{where}: no split {split!r} (has {', '.join(splits) or 'none'})")
    try:
        validate(splits[split], SPLIT, f"splits.{split}")     # a manifest not from load_manifest too
    except SchemaError as error:
        raise UserError(f"{where}: {error}") from None
    root = getattr(manifest, "root", None) or pin_shard_dir(shard_dir)
    entries = []
    for shard in splits[split]["shards"]:
        tar, index = root / shard["file"], root / shard["index"]
        if not tar.is_file():
            raise UserError(f"{tar}: shard listed in the manifest is missing")
        if not index.is_file():
            raise UserError(f"{index}: shard index listed in the manifest is missing")
        samples = read_index(index)
        check_shard_length(tar, index, samples, shard["pairs"])
        if verify:
            check_shard_hash(tar, shard["sha256"])
        entries.append({**shard, "tar": tar, "idx": index, "samples": samples})
    return entries


def check_shard_length(tar: Path, index: Path, samples: Sequence[IndexedSample], promised: int) -> None:
    """The index lists the promised number of samples, and the tar reaches past the last of them."""
    if len(samples) != promised:
        raise UserError(f"{index}: lists {len(samples)} samples, the manifest says {promised} "
                        f"(the index or the manifest is from another run; re-pack or re-extract)")
    end = max((offset + size for sample in samples for offset, size in sample.members.values()), default=0)
    size = tar.stat().st_size
    if size < end:
        raise UserError(f"{tar}: cut short ({size} bytes; its {promised} samples need {end}): a copy or "
                        f"write that did not finish")


def check_shard_hash(path: Path, promised: str) -> None:
    actual = sha256_file(path)
    if actual != promised:
        raise UserError(f"{path}: sha256 {actual[:12]}... differs from the manifest's {promised[:12]}...: the shard "
                        f"changed since the manifest was written (re-pack or re-extract)")


def iter_samples(tar_path: Path, index_path: Path, exts: Sequence[str] | None = None,
                 keys: Container[str] | None = None,
                 samples: Sequence[IndexedSample] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard in order, as (key, {ext: bytes}), read through its index (`samples`:
    the index already read): every member, or only `exts` (each must be there); every sample, or
    only those in `keys`."""
    samples = read_index(index_path) if samples is None else samples
    with open(tar_path, "rb") as f:
        for sample in samples:
            if keys is not None and sample.key not in keys:
                continue
            members = {}
            for ext in sample.members if exts is None else exts:
                if ext not in sample.members:
                    raise UserError(f"{tar_path}: sample {sample.key} has no {ext} member")
                offset, size = sample.members[ext]
                f.seek(offset)
                members[ext] = f.read(size)
                if len(members[ext]) != size:
                    raise UserError(f"{tar_path}: truncated at sample {sample.key}")
            yield sample.key, members


def read_members(entries: Sequence[dict], exts: Sequence[str], keys: Container[str] | None = None) -> dict[str, dict]:
    """key -> {ext: bytes} of the given members, for every sample (or those in `keys`) of the shards
    (`split_shards` entries)."""
    return {key: members for entry in entries
            for key, members in iter_samples(entry["tar"], entry["idx"], exts, keys, entry.get("samples"))}
