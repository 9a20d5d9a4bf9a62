"""The model runner of a decode-context-parallel rank: the same step on every rank, each on its shard.

Rank 0 (the driver) is an ordinary engine whose ``ModelRunner.execute`` is reused as is: its
``build_metadata`` first broadcasts the step (token ids, computed counts, the round block table
— engine/dcp_group.py) and then, like every worker, builds *this rank's* metadata from it
(engine/attention/dcp_backend.py says how the KV is laid out). Workers (ranks 1..N-1) sit in
``serve_worker``: build the same inputs, run the same forward (the DCP attention backend's
all-gather meets the driver's, layer by layer), and discard the hidden states — only the
driver samples. Blocks pulled through the driver's connector reach their owners through
``write_blocks``.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.dcp_backend import DCPAttentionBackend, DCPAttentionMetadata, local_seq_lens, local_slot_mapping
from engine.dcp_group import OP_BLOCKS, OP_STEP, OP_STOP, DCPGroup
from engine.model_runner import ModelRunner
from engine.scheduler import SchedulerOutput

_BLOCKS_PER_MESSAGE = 64  # bounds the device buffer of a block transfer to a worker


def _payload_len(op: int, sizes: tuple[int, int, int]) -> int:
    if op == OP_STEP:
        num_reqs, num_tokens, width = sizes
        return 2 * num_reqs + num_tokens + num_reqs * width
    if op == OP_BLOCKS:
        return 2 * sizes[0]
    return 0


class DCPModelRunner(ModelRunner):
    def __init__(self, group: DCPGroup, model: torch.nn.Module, model_config, backend: AttentionBackend,
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 eos_token_ids: frozenset[int]) -> None:
        super().__init__(model, model_config, DCPAttentionBackend(backend, group), num_blocks, block_size, dtype,
                         device, eos_token_ids)
        self.group = group

    # ---- driver -----------------------------------------------------------------------------------

    def build_metadata(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        reqs = out.scheduled
        q_lens = np.fromiter((s.num_new_tokens for s in reqs), dtype=np.int64, count=len(reqs))
        starts = np.fromiter((s.request.num_computed_tokens for s in reqs), dtype=np.int64, count=len(reqs))
        input_ids = np.fromiter(
            (t for s in reqs for t in s.request.token_ids_slice(s.request.num_computed_tokens,
                                                                 s.request.num_computed_tokens + s.num_new_tokens)),
            dtype=np.int64, count=int(q_lens.sum()),
        )
        round_tokens = self.group.size * self.block_size
        width = int(-(-(starts + q_lens).max() // round_tokens))
        table = np.zeros((len(reqs), width), dtype=np.int64)
        for i, s in enumerate(reqs):
            ids = s.block_ids[:width]
            table[i, : len(ids)] = ids
        self.group.send_message(OP_STEP, (len(reqs), len(input_ids), width),
                                np.concatenate([q_lens, starts, input_ids, table.ravel()]))
        return self._step_inputs(q_lens, starts, input_ids, table)

    def write_blocks(self, source: torch.Tensor, src_ids: np.ndarray, dest_rank: np.ndarray,
                     dest_ids: np.ndarray) -> None:
        """Store blocks ``source[src_ids[i]]`` (a cache-shaped tensor on any device) as block
        ``dest_ids[i]`` of rank ``dest_rank[i]``; every rank takes part."""
        self.group.send_message(OP_BLOCKS, (len(dest_ids), 0, 0), np.concatenate([dest_rank, dest_ids]))
        for r in range(self.group.size):
            sel = np.nonzero(dest_rank == r)[0]
            for a in range(0, len(sel), _BLOCKS_PER_MESSAGE):
                part = sel[a:a + _BLOCKS_PER_MESSAGE]
                blocks = source[torch.from_numpy(src_ids[part])]
                if r == 0:
                    self.kv_cache[self._to_device(dest_ids[part])] = blocks.to(self.device)
                else:
                    self.group.send(blocks, dst=r)

    # ---- worker -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def serve_worker(self) -> None:
        """Run the driver's steps on this rank's shard until it says STOP."""
        while True:
            op, sizes, payload = self.group.recv_message(_payload_len)
            if op == OP_STOP:
                return
            if op == OP_STEP:
                r, t, _ = sizes
                input_ids, positions, meta = self._step_inputs(
                    payload[:r], payload[r:2 * r], payload[2 * r:2 * r + t], payload[2 * r + t:].reshape(r, -1))
                self.model(input_ids, positions, self.kv_cache, meta, self.backend)
            elif op == OP_BLOCKS:
                n = sizes[0]
                ids = payload[n:][payload[:n] == self.group.rank]
                for a in range(0, len(ids), _BLOCKS_PER_MESSAGE):
                    chunk = ids[a:a + _BLOCKS_PER_MESSAGE]
                    buf = self.group.recv((len(chunk), *self.kv_cache.shape[1:]), self.kv_cache.dtype)
                    self.kv_cache[self._to_device(chunk)] = buf.to(self.device)
            else:
                raise RuntimeError(f"DCP worker {self.group.rank}: unknown message op {op}")

    # ---- every rank -------------------------------------------------------------------------------

    def _step_inputs(self, q_lens: np.ndarray, starts: np.ndarray, input_ids: np.ndarray,
                     table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, DCPAttentionMetadata]:
        bs, rank, size = self.block_size, self.group.rank, self.group.size
        num_reqs = len(q_lens)
        seq_lens = starts + q_lens
        cu = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        positions = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
        token_req = np.repeat(np.arange(num_reqs), q_lens)
        slots = local_slot_mapping(positions, token_req, table, rank, size, bs)
        local = local_seq_lens(seq_lens, rank, size, bs)
        nd = int(np.argmax(q_lens > 1)) if (q_lens > 1).any() else num_reqs
        cu_t = self._to_device(cu.astype(np.int32))
        local_t = self._to_device(local.astype(np.int32))
        table_t = self._to_device(table.astype(np.int32))
        slots_t = self._to_device(slots)
        decode_meta = None
        if nd:
            decode_meta = AttentionMetadata(
                num_tokens=nd, num_decodes=nd, query_start_loc=cu_t[: nd + 1], seq_lens=local_t[:nd],
                block_tables=table_t[:nd], slot_mapping=slots_t[:nd], max_query_len=1,
                max_seq_len=int(local[:nd].max()), query_lens_cpu=[1] * nd, seq_lens_cpu=local[:nd].tolist())
        meta = DCPAttentionMetadata(
            num_tokens=int(cu[-1]), num_decodes=nd, query_start_loc=cu_t, seq_lens=local_t, block_tables=table_t,
            slot_mapping=slots_t, max_query_len=int(q_lens.max()), max_seq_len=int(local.max()),
            query_lens_cpu=q_lens.tolist(), seq_lens_cpu=local.tolist(), decode_meta=decode_meta,
            global_seq_lens_cpu=seq_lens.tolist())
        return self._to_device(np.ascontiguousarray(input_ids)), self._to_device(positions), meta
