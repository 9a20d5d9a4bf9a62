"""The rank group of a decode-context-parallel engine, and the messages rank 0 sends its workers.

Rank 0 runs the scheduler; ranks 1..N-1 run the same model on their shard of the KV and wait
for rank 0's word. torch.distributed carries everything — NCCL between GPUs, gloo on CPU — and
nothing is pickled: each message is a header of four int64 (op, three sizes) broadcast from
rank 0, then, for a step, one int64 payload:

- ``STEP(num_reqs R, num_tokens T, width W)``: ``q_lens[R] | num_computed_tokens[R] |
  input_ids[T] | round block table[R * W]`` — all a worker needs to build its own metadata;
- ``BLOCKS(n)``: ``dest_rank[n] | dest_block_id[n]``, then the block bytes point-to-point from
  rank 0 to each worker that owns some (KV pulled through rank 0's connector, engine/dcp_kv_landing.py);
- ``STOP``.

A worker waits in a broadcast for as long as the server is idle, so the group's timeout is long
(``IDLE_TIMEOUT``): a dead rank 0 still takes its workers with it (the launcher ties their life
to it), it is only a live, idle one that must not look like a hang.
"""

from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist

OP_STEP, OP_BLOCKS, OP_STOP = 1, 2, 3
IDLE_TIMEOUT = datetime.timedelta(days=30)
# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DCPGroup:
    def __init__(self, rank: int, size: int, init_method: str, device: torch.device) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"DCP rank {rank} is outside a group of {size}")
        self.rank, self.size = rank, size
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(self.backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=IDLE_TIMEOUT)
        self._closed = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ---- collectives -------------------------------------------------------------------------

    def all_gather(self, part: torch.Tensor) -> torch.Tensor:
        """part [...] on every rank -> [size, ...], rank order."""
        out = torch.empty((self.size * part.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        _all_gather_single(out, part.contiguous())
        return out.view(self.size, *part.shape)

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.to(self.device).contiguous(), dst=dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=0)
        return buf

    # ---- rank 0 -> workers --------------------------------------------------------------------

    def send_message(self, op: int, sizes: tuple[int, int, int] = (0, 0, 0), payload: np.ndarray | None = None) -> None:
        header = torch.tensor([op, *sizes], dtype=torch.int64)
        dist.broadcast(header.to(self.device), src=0)
        if payload is not None:
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload, dtype=np.int64)).to(self.device), src=0)

    def recv_message(self, payload_len) -> tuple[int, tuple[int, int, int], np.ndarray | None]:
        """(op, sizes, payload); ``payload_len(op, sizes)`` says how long the payload is (0: none)."""
        header = torch.empty(4, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        op, *sizes = header.tolist()
        n = payload_len(op, tuple(sizes))
        if not n:
            return op, tuple(sizes), None
        payload = torch.empty(n, dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=0)
        return op, tuple(sizes), payload.cpu().numpy()

    def close(self) -> None:
        """Rank 0: tell the workers to stop. Every rank: leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.is_driver:
            try:
                self.send_message(OP_STOP)
            except RuntimeError:  # a worker is gone already (it failed to start): nothing to stop
                pass
        dist.destroy_process_group()
