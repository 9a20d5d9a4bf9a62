"""CUDA graphs for decode steps: the whole forward captured once per padded batch size.

A decode step of a small model is a few hundred tiny kernel launches; replaying a captured
graph removes the launch gaps. Each graph reads its inputs from static buffers: a step copies
its tokens, positions, slots, context lengths and block tables into them, pads the batch up to
the nearest captured size (padded rows: context length 0, slot -1), replays, and
reads the first rows of the static output. Block tables are captured at the width of
``max_model_len`` so any context fits. Only decode-only batches replay; the rest run eagerly.
"""

from __future__ import annotations

import bisect
import logging

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_cache: torch.Tensor,
                 max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.sizes = capture_sizes(max_num_seqs)
        n, dev = self.sizes[-1], kv_cache.device
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=bs, num_decodes=bs, query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            max_query_len=1, max_seq_len=self.max_model_len, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
                meta = self._meta(bs)
                for _ in range(2):
                    self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta, self.backend)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta, self.backend)
                pool = graph.pool()
                self.graphs[bs], self.outputs[bs] = graph, out
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_reqs and meta.num_reqs <= self.sizes[-1] \
            and meta.block_tables.shape[1] <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_reqs
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        if n < bs:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        # Table entries past a row's width are left stale: attention reads only the first
        # ceil(seq_len / block_size) entries of a row (none for a padded row).
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
