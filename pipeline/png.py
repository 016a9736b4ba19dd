"""PNG frames: the chunk walk without decoding, shared by the packer (which validates every frame)
and the loader (which must never hand DALI a corrupt frame: its CPU decoder crashes the process at
shutdown after failing on one); and the one PIL decode every reader outside DALI uses."""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

from zlib_ng import zlib_ng      # CRC-32 several times faster than zlib's on these small frames

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadFrame(Exception):
    """A frame that cannot be used; the message is the reason listed in the manifest."""


@dataclass(frozen=True)
class Ihdr:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool


def png_chunks(data: bytes) -> tuple[Ihdr, bytes]:
    """Walk the chunks, checking every CRC; returns the header and the joined image data."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadFrame("not a PNG")
    pos, ihdr, idat, ended = len(PNG_SIGNATURE), None, [], False
    while not ended:
        if pos + 12 > len(data):
            raise BadFrame("truncated PNG")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise BadFrame("truncated PNG")
        body = data[pos + 8:end - 4]
        if zlib_ng.crc32(body, zlib_ng.crc32(kind)) != struct.unpack_from(">I", data, end - 4)[0]:
            raise BadFrame(f"corrupt PNG (bad CRC in {kind.decode('latin-1')!r} chunk)")
        if ihdr is None:
            if kind != b"IHDR" or length != 13:
                raise BadFrame("corrupt PNG (does not start with IHDR)")
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            ihdr = Ihdr(width, height, depth, color, interlace != 0)
        elif kind == b"IDAT":
            idat.append(body)
        ended = kind == b"IEND"
        pos = end
    return ihdr, b"".join(idat)


def decode_png_rgb(data: bytes) -> np.ndarray:
    """PIL decode to uint8 (H, W, 3): the plain-PyTorch loader's decoder, the stream reader's and
    evaluation's, and the reference in diagnostics."""
    from PIL import Image       # the packer's workers import this module and decode with PIL only when they must

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_png(data: bytes):
    """PNG bytes -> a uint8 (H, W, 3) torch tensor; gray conversion is left to `frames.to_model_input`,
    as in the loaders."""
    import torch                # not at the top: the packer imports this module and never needs torch

    return torch.from_numpy(decode_png_rgb(data).copy())
