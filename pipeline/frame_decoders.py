"""The one place the two loader backends differ: how a list of frame ids becomes decoded pixels.

A decoder takes jobs (each a list of frame ids of a PairIndex) and yields, job by job and in order,
uint8 (n, H, W, 3) RGB tensors on the loader's device, each valid until the next is asked for.
Everything else (which pairs, in what order, caching, preprocessing) is shared in loader.py, so the
backends can only differ here.

- DaliFrameDecoder: a DALI pipeline; an external source reads each frame's PNG bytes from its tar by
  the offset in the `.idx` and DALI decodes them on its CPU thread pool ("mixed" on a GPU: the
  pixels land in GPU memory).
- PilFrameDecoder: a torch DataLoader whose workers decode with PIL.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from common.errors import UserError
from pipeline.pair_index import FrameReader, PairIndex, raise_for_bad_frames
from pipeline.png import decode_png_rgb

Job = np.ndarray        # int64 frame ids, decoded together


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


class FrameDecoder:
    """Decodes jobs of frame ids; a failing job is re-checked frame by frame so the error names the
    tar and member that is bad, instead of a decoder's own message."""

    #: how many jobs past the one being consumed may already be in flight (where to look for a bad frame)
    lookahead = 1

    def __init__(self, index: PairIndex, device: torch.device):
        self.index, self.device = index, device

    def decode(self, jobs: Sequence[Job]) -> Iterator[torch.Tensor]:
        done, frame_batches = 0, self._decode(jobs)
        try:
            for frames in frame_batches:
                if tuple(frames.shape[1:]) != (self.index.height, self.index.width, 3):
                    raise_for_bad_frames(self.index, jobs[done])
                    raise UserError(f"{self.index.tars[0].parent}: decoded frames have shape "
                                    f"{tuple(frames.shape[1:])}, expected ({self.index.height}, {self.index.width}, 3)")
                yield frames
                done += 1
        except UserError:
            raise
        except Exception:
            suspects = jobs[done:done + self.lookahead + 1]
            raise_for_bad_frames(self.index, np.concatenate(suspects) if suspects else [])
            raise
        finally:
            frame_batches.close()         # a consumer that stops early ends the decoder's pass now

    def _decode(self, jobs: Sequence[Job]) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Free threads, workers and buffers (called once the loader no longer needs to decode)."""


# --------------------------------------------------------------------------------------------- DALI
class DaliFrameDecoder(FrameDecoder):
    def __init__(self, index: PairIndex, device: torch.device, *, max_frames: int, threads: int,
                 prefetch: int = 2):
        super().__init__(index, device)
        self.max_frames, self.threads, self.prefetch = max_frames, threads, prefetch
        self.lookahead = prefetch
        self._reader = FrameReader(index)
        self._pipe = None
        self._buffer: torch.Tensor | None = None
        self._jobs: Sequence[Job] = ()

    def _encoded_job(self, info) -> list[np.ndarray]:
        # DALI calls this ahead of consumption (prefetch); StopIteration marks the end of the pass
        if info.iteration >= len(self._jobs):
            raise StopIteration
        return [np.frombuffer(self._reader.read_png(frame), dtype=np.uint8) for frame in self._jobs[info.iteration]]

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.max_frames, num_threads=self.threads, prefetch_queue_depth=self.prefetch,
                      device_id=self.device.index if on_gpu else None)
        def png_frames():
            encoded = fn.external_source(source=self._encoded_job, batch=True, batch_info=True,
                                         dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)

        pipe = png_frames()
        pipe.build()
        return pipe

    def _decode(self, jobs: Sequence[Job]) -> Iterator[torch.Tensor]:
        if not len(jobs):
            return
        if self._pipe is None:
            self._pipe = self._build()
        self._jobs = jobs
        finished = False
        try:
            for _ in range(len(jobs)):
                (decoded,) = self._pipe.run()
                yield self._to_torch(decoded)
            try:
                self._pipe.run()          # the source's StopIteration, so that reset() rewinds it
            except StopIteration:
                pass
            self._pipe.reset()
            finished = True
        finally:
            if not finished:              # stopped early or failed: prefetched jobs are stale, start afresh
                self._pipe = None

    def _to_torch(self, decoded) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = decoded.as_tensor()       # fails on mixed frame sizes: the caller names the bad frame
        shape = dense.shape()
        if self._buffer is None or self._buffer.shape[1:] != tuple(shape[1:]):
            self._buffer = torch.empty((self.max_frames, *shape[1:]), dtype=torch.uint8, device=self.device)
        frames = self._buffer[:shape[0]]  # reused: a job's frames are consumed before the next is asked for
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, frames, cuda_stream=stream)
        return frames

    def close(self) -> None:
        self._pipe = self._buffer = None
        self._reader.close()
        from nvidia.dali.backend import ReleaseUnusedMemory

        ReleaseUnusedMemory()             # DALI keeps freed buffers pooled; hand them back


# ----------------------------------------------------------------------------------- plain PyTorch
class _DecodeJobs(torch.utils.data.Dataset):
    """Job i -> its frames, decoded with PIL; or, for a bad frame, the error message naming it.

    The message is returned, not raised: an exception raised in a worker comes back holding the
    DataLoader iterator in a reference cycle, which keeps the workers alive until garbage collection
    (and then takes seconds to stop them)."""

    def __init__(self, index: PairIndex, jobs: Sequence[Job]):
        self.index, self.reader, self.jobs = index, FrameReader(index), jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        frames = []
        for frame in self.jobs[i]:
            try:
                data = self.reader.read_png(frame)
                frames.append(decode_png_rgb(data))
            except UserError as error:
                return str(error)
            except Exception as error:
                return f"{self.index.describe_frame(frame)} is not a readable PNG ({error})"
        return torch.from_numpy(np.stack(frames))


class PilFrameDecoder(FrameDecoder):
    def __init__(self, index: PairIndex, device: torch.device, *, workers: int, prefetch: int = 2):
        super().__init__(index, device)
        self.workers, self.prefetch = workers, prefetch
        self.lookahead = workers * prefetch

    def _decode(self, jobs: Sequence[Job]) -> Iterator[torch.Tensor]:
        # Workers live for one pass: nothing is left running between epochs or after a cache fill.
        workers = min(self.workers, len(jobs))
        # Its own generator: a DataLoader iterator otherwise draws its worker seed from the global
        # torch RNG, so each pass (a validation, a resumed epoch) would shift the training run's
        # random stream and a resumed run would not equal an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            _DecodeJobs(self.index, jobs), batch_size=None, num_workers=workers,
            prefetch_factor=self.prefetch if workers else None, pin_memory=self.device.type == "cuda",
            generator=torch.Generator())
        for frames in loader:
            if isinstance(frames, str):
                raise UserError(frames)
            yield frames.to(self.device, non_blocking=True)
