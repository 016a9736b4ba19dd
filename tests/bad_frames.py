"""Bulk videos with bad and unusual frames, made from the session's recorded episodes: shared by the
packer's tests (what it rejects and converts) and the loader's (frame t-1 after a rejected frame)."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def copy_episode(videos: Path, index: int, dst: Path) -> Path:
    source = sorted(videos.iterdir())[index]
    shutil.copytree(source, dst)
    return dst


def rewrite_idat(data: bytes, change) -> bytes:
    """`data` with its IDAT payload changed by `change` and the chunk CRC made valid again."""
    pos = 8
    while True:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            body = change(data[pos + 8:pos + 8 + length])
            chunk = struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))
            return data[:pos] + chunk + data[pos + 12 + length:]
        pos += 12 + length


def make_broken_videos(videos: Path, src: Path) -> Path:
    """Four episodes with every kind of bad and unusual frame (tests/test_pack.py lists what the
    packer makes of each: BROKEN_REJECTED, BROKEN_CONVERTED)."""
    a = copy_episode(videos, 0, src / "A bad bytes")
    (a / "5.png").write_bytes(b"hello, not a png")
    (a / "8.png").write_bytes((a / "8.png").read_bytes()[:300])
    (a / "20.png").write_bytes(b"")
    shutil.copy(a / "30.png", a / "030.png")        # two files claim frame 30
    b = copy_episode(videos, 1, src / "B [gaps].v2")
    Image.open(b / "3.png").resize((80, 100)).save(b / "3.png")
    (b / "10.png").unlink()
    data = bytearray((b / "12.png").read_bytes())
    data[len(data) // 2] ^= 0xFF                    # a flipped byte inside the image data: CRC fails
    (b / "12.png").write_bytes(bytes(data))
    good = (b / "30.png").read_bytes()              # valid CRCs, but the deflate stream is cut short
    (b / "30.png").write_bytes(rewrite_idat(good, lambda body: body[: len(body) // 2]))
    (b / "meta.jsonl").write_text((b / "meta.jsonl").read_text() + "{not json\n")
    c = copy_episode(videos, 2, src / "C converted")
    Image.open(c / "1.png").convert("L").save(c / "1.png")
    Image.open(c / "2.png").convert("RGBA").save(c / "2.png")
    Image.open(c / "3.png").quantize(16).save(c / "3.png")
    gray16 = (np.asarray(Image.open(c / "4.png").convert("L")).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(c / "4.png")
    assert Image.open(c / "4.png").mode.startswith("I")
    d = src / "D one frame"
    d.mkdir()
    shutil.copy(c / "0.png", d / "0.png")
    return src
