"""Decode context parallelism (DCP): one request's KV sharded across N ranks, attention merged exactly.

**Layout: interleaved by block.** Global block ``k`` of a sequence (tokens ``k*bs .. k*bs+bs-1``)
lives on rank ``k % N``. The scheduler's KV manager counts in *rounds* of N blocks (``N*bs``
tokens): round ``m`` is global blocks ``m*N .. m*N+N-1``, one block on each rank, and every rank
stores its block of round ``m`` under the same local block id — so one block table (of round
ids) serves every rank, and one pool of rounds on rank 0 accounts exactly for every rank's
budget (a round is free on all ranks or on none).

Why blocks and not tokens: the block is the unit of everything else — the prefill engine
ships whole blocks, connectors and tiers move and name whole blocks, the prefix cache hashes
whole blocks. With block interleave a shipped block lands whole on one rank; with token
interleave every shipped block would be cut into N strided pieces. What token interleave buys
— perfect balance — is worth at most one block per sequence here: the ranks' shares of a
sequence differ by at most ``bs`` tokens (16 of a 32k context: 0.05%), and a decode writes its
one new token on one rank either way. The last round of a request may be partly empty on some
ranks: at most N-1 blocks per request, the price of lockstep accounting.

**Attention.** Each rank writes only the tokens it owns (other slots are -1, skipped by every
backend's ``write_kv``), computes attention of *all* query heads over its shard, and returns
(out, lse); one all-gather per layer brings every rank's partials and ``merge_attn_states``
combines them exactly. Everything outside attention runs redundantly on every rank. Decode
tokens see every key before them, so the wrapped backend (Triton or torch) runs unchanged over
the shard, with local block tables and local sequence lengths. Prefill chunks (a colocated DCP
instance, or recompute after preemption) need the causal mask on *global* positions, which the
wrapped kernels do not know about: they go through a torch path here that maps each local key
to its global position. It is exact but not fast; disaggregated decode instances receive their
prompt's KV from the prefill side and compute prefills rarely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.merge import merge_attn_states
from engine.attention.torch_backend import attention_with_lse

_MAX_SCORES = 1 << 26  # float32 scores per prefill slice: bounds the torch path's temporary memory


def local_seq_lens(seq_lens: np.ndarray, rank: int, size: int, block_size: int) -> np.ndarray:
    """How many of the first ``seq_lens`` tokens of a sequence ``rank`` stores."""
    round_tokens = size * block_size
    return (seq_lens // round_tokens) * block_size + np.clip(seq_lens % round_tokens - rank * block_size, 0, block_size)


def local_slot_mapping(positions: np.ndarray, token_req: np.ndarray, round_tables: np.ndarray, rank: int,
                       size: int, block_size: int) -> np.ndarray:
    """Slot of each token in ``rank``'s cache, -1 for tokens another rank owns."""
    owned = (positions // block_size) % size == rank
    rounds = round_tables[token_req, positions // (size * block_size)].astype(np.int64)
    return np.where(owned, rounds * block_size + positions % block_size, -1)


def global_key_positions(num_local: int, rank: int, size: int, block_size: int, device) -> torch.Tensor:
    """The global position of each of ``rank``'s first ``num_local`` keys of a sequence."""
    j = torch.arange(num_local, device=device)
    return (j // block_size) * (size * block_size) + rank * block_size + j % block_size


@dataclass
class DCPAttentionMetadata(AttentionMetadata):
    """This rank's view of a step. ``seq_lens``/``seq_lens_cpu``/``max_seq_len`` count the keys
    this rank stores, ``block_tables`` hold round ids, ``slot_mapping`` is -1 for tokens other
    ranks own; ``query_start_loc``/``query_lens_cpu`` are the step's, as on one rank."""

    decode_meta: AttentionMetadata | None = None  # the first num_decodes requests, for the wrapped backend
    global_seq_lens_cpu: list[int] = field(default_factory=list)


class DCPAttentionBackend(AttentionBackend):
    """Wraps a backend: partial attention over this rank's shard, one all-gather, an exact merge."""

    name = "dcp"

    def __init__(self, inner: AttentionBackend, group) -> None:
        super().__init__(inner.block_size)
        self.inner = inner
        self.group = group  # engine.dcp_group.DCPGroup: rank, size, all_gather
        self.name = f"dcp({inner.name})"

    def write_kv(self, key, value, layer_cache, meta: DCPAttentionMetadata) -> None:
        self.inner.write_kv(key, value, layer_cache, meta)

    def forward(self, query, layer_cache, meta: DCPAttentionMetadata, scale, key=None, value=None, return_lse=True):
        t, h, d = query.shape
        part = torch.empty(t, h, d + 1, dtype=torch.float32, device=query.device)  # [out | lse]
        nd = meta.num_decodes
        if nd:
            out, lse = self.inner.forward(query[:nd], layer_cache, meta.decode_meta, scale)
            part[:nd, :, :d] = out[:nd]
            part[:nd, :, d] = lse[:nd]
        s = nd
        for i in range(nd, meta.num_reqs):
            e = s + meta.query_lens_cpu[i]
            self._prefill_chunk(query[s:e], layer_cache, meta, i, scale, part[s:e])
            s = e
        parts = self.group.all_gather(part[: meta.num_tokens])  # [N, T, H, D + 1]
        out, lse = merge_attn_states(parts[..., :d], parts[..., d])
        if meta.num_tokens == t:
            return out.to(query.dtype), lse
        full = torch.zeros_like(query)  # rows past num_tokens (a padded batch) stay empty
        full[: meta.num_tokens] = out
        full_lse = torch.full((t, h), float("-inf"), device=query.device)
        full_lse[: meta.num_tokens] = lse
        return full, full_lse

    def _prefill_chunk(self, q, layer_cache, meta: DCPAttentionMetadata, i: int, scale, part) -> None:
        """Causal attention of one prefill chunk over this rank's keys, masked on global positions."""
        bs, rank, size = self.block_size, self.group.rank, self.group.size
        num_local = meta.seq_lens_cpu[i]
        seq_len = meta.global_seq_lens_cpu[i]
        nblk = -(-num_local // bs)
        kv = layer_cache[meta.block_tables[i, :nblk].long()]  # [nblk, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(nblk * bs, *kv.shape[-2:])[:num_local].unsqueeze(0)
        v = kv[:, 1].reshape(nblk * bs, *kv.shape[-2:])[:num_local].unsqueeze(0)
        key_pos = global_key_positions(num_local, rank, size, bs, q.device)
        q_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)
        step = max(1, _MAX_SCORES // max(1, num_local * q.shape[1]))
        d = q.shape[-1]
        for a in range(0, q.shape[0], step):
            b = min(a + step, q.shape[0])
            mask = (key_pos[None, :] <= q_pos[a:b, None])[None]
            out, lse = attention_with_lse(q[a:b].unsqueeze(0), k, v, mask, scale)
            part[a:b, :, :d] = out[0]
            part[a:b, :, d] = lse[0]
