"""Exact merge of attention computed over disjoint shards of the keys, weighted by log-sum-exp.

If shard i gave ``out_i = sum_k softmax_i(s)_k v_k`` and ``lse_i = log sum_k exp(s_k)``, then
attention over the union is ``sum_i exp(lse_i - lse) out_i`` with ``lse = log sum_i exp(lse_i)``.
A shard that held no keys for a token has lse -inf and weight 0; a token with no keys anywhere
comes out as zeros with lse -inf, as the reference backend gives. Used by decode context
parallelism (each rank holds one shard of every sequence's KV).
"""

from __future__ import annotations

import torch


def merge_attn_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outs [N, T, H, D], lses [N, T, H] (natural log) -> out [T, H, D] in outs' dtype, lse [T, H] float32."""
    lses = lses.float()
    m = lses.amax(dim=0)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m)  # exp(-inf) = 0: empty shards drop out
    total = w.sum(dim=0)
    w = w.unsqueeze(-1)
    # where(), not a product alone: an empty shard's output may be anything (even NaN) at weight 0.
    weighted = torch.where(w > 0, outs.float() * w, torch.zeros((), dtype=torch.float32, device=outs.device))
    out = weighted.sum(dim=0) / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    lse = m + torch.log(total)  # log 0 = -inf where no shard had keys
    return out.to(outs.dtype), lse
