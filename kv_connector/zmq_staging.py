"""Pinned host staging for the ``zmq`` connector's device caches, pipelined with the socket.

TCP moves host memory, so a GPU cache's blocks cross host memory on both sides. Done naively
(a pageable ``.cpu()`` per frame on the producer; a copy into pinned memory, an upload and a
wait per frame on the consumer) each side does one thing at a time and pageable copies run at a
fraction of the link. Here:

- **producer** (``SendStaging``): a read's blocks are cut into frames of ``max_frame_bytes`` by
  *position in the load* (not by runs of consecutive ids, so scattered blocks still make full
  frames); each frame is gathered on the GPU (one ``index_select``, or a slice for a run) and
  copied into a pinned buffer on a side stream. ``depth`` frames are in flight at once: while
  ZeroMQ sends one, the next ones' copies run. A buffer is reused only once ZeroMQ's tracker
  says it has sent the frame; when none is free, another is made (up to ``max_buffers``), then a
  frame falls back to a pageable copy rather than block the server thread on a slow consumer.
  The held blocks are read only by the copies, so the hold may end as soon as the last copy has.
- **consumer** (``RecvStaging``): each frame is copied into one of ``depth`` pinned buffers and
  uploaded on the copy stream without waiting; a buffer is reused once its upload's event has
  fired, and the load is reported only after the stream has finished every upload.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import numpy as np
import torch
import zmq


class _Staged:
    """A buffer handed out and not yet sent: not free, whatever ZeroMQ says."""

    done = False


_STAGED = _Staged()


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class SendStaging:
    """Producer side: frames of a device cache's blocks, staged through pinned buffers."""

    def __init__(self, blocks: torch.Tensor, frame_bytes: int, depth: int = 4, max_buffers: int = 8) -> None:
        self.blocks = blocks  # [num_blocks, block_bytes] uint8 on a GPU
        self.block_bytes = blocks.shape[1]
        self.per_frame = max(1, frame_bytes // self.block_bytes)
        self.depth = max(1, depth)
        self.max_buffers = max(self.depth, max_buffers)
        self.stream = torch.cuda.Stream(blocks.device)
        self._buffers: list[tuple[torch.Tensor, list[Any]]] = []  # (pinned buffer, [its last tracker])

    def _free_buffer(self) -> torch.Tensor | None:
        for buf, last in self._buffers:
            if last[0] is None or last[0].done:
                last[0] = _STAGED
                return buf
        if len(self._buffers) < self.max_buffers:
            self._buffers.append((_pinned(self.per_frame * self.block_bytes), [_STAGED]))
            return self._buffers[-1][0]
        return None

    def _track(self, buf: torch.Tensor, tracker: zmq.MessageTracker) -> None:
        for b, last in self._buffers:
            if b is buf:
                last[0] = tracker

    def frames(self, block_ids: list[int]) -> Iterator[tuple[int, int, Any, torch.Tensor | None]]:
        """(position, count, payload, pinned buffer or None) per frame, each ready to send; the
        caller sends it and hands the buffer's tracker to ``sent``."""
        ids = torch.as_tensor(block_ids, dtype=torch.int64)
        ids_dev = ids.to(self.blocks.device, non_blocking=False)
        # The forward that wrote the blocks ran on the default stream; copies here follow it.
        self.stream.wait_stream(torch.cuda.default_stream(self.blocks.device))
        queued: collections.deque = collections.deque()
        positions = iter(range(0, len(block_ids), self.per_frame))

        def launch(pos: int) -> None:
            n = min(self.per_frame, len(block_ids) - pos)
            buf = self._free_buffer()
            first, run = int(ids[pos]), bool((ids[pos:pos + n] == ids[pos] + torch.arange(n)).all())
            with torch.cuda.stream(self.stream):
                src = self.blocks[first:first + n] if run else self.blocks.index_select(0, ids_dev[pos:pos + n])
                if buf is None:  # every buffer is still on the wire: a pageable copy, sent as is
                    queued.append((pos, n, src.to("cpu", non_blocking=False).numpy(), None, None))
                    return
                out = buf[:n * self.block_bytes].view(n, self.block_bytes)
                out.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            queued.append((pos, n, out, buf, done))

        for pos in positions:
            launch(pos)
            if len(queued) >= self.depth:
                break
        while queued:
            pos, n, out, buf, done = queued.popleft()
            if done is not None:
                done.synchronize()
            nxt = next(positions, None)
            if nxt is not None:  # the next copy runs while this frame is on the wire
                launch(nxt)
            yield pos, n, (out.numpy() if isinstance(out, torch.Tensor) else out), buf

    def sent(self, buf: torch.Tensor | None, tracker: zmq.MessageTracker) -> None:
        if buf is not None:
            self._track(buf, tracker)

    def settle(self) -> None:
        """After a read, however it ended: no copy reads the held blocks any more, and buffers
        staged for frames that were never sent are free again."""
        self.stream.synchronize()
        for _, last in self._buffers:
            if last[0] is _STAGED:
                last[0] = None


class RecvStaging:
    """Consumer side: frames into pinned buffers, uploaded on the copy stream without waiting."""

    def __init__(self, frame_bytes: int, depth: int = 4) -> None:
        self.frame_bytes = frame_bytes
        self._ring: collections.deque = collections.deque()  # (pinned buffer, upload event or None)
        self.depth = max(1, depth)

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A pinned buffer of at least ``nbytes`` whose last upload has finished."""
        if len(self._ring) < self.depth:
            buf, event = _pinned(max(nbytes, self.frame_bytes)), None
        else:
            buf, event = self._ring.popleft()
            if event is not None:
                event.synchronize()
            if buf.numel() < nbytes:
                buf = _pinned(nbytes)
        return buf

    def uploaded(self, buf: torch.Tensor, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self._ring.append((buf, event))

    @staticmethod
    def stage(buf: torch.Tensor, src: np.ndarray) -> torch.Tensor:
        staged = buf[:src.size].view(src.shape)
        staged.numpy()[...] = src
        return staged
