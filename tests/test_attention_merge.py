"""The LSE-weighted merge of attention over disjoint KV shards equals attention over all keys."""

from __future__ import annotations

import pytest
import torch

from engine.attention.merge import merge_attn_states
from engine.attention.torch_backend import attention_with_lse


def _shards(num_keys: int, num_shards: int, empty_shard: bool, gen: torch.Generator) -> list[torch.Tensor]:
    """A random partition of the key indices (interleaved, not contiguous), optionally one shard empty."""
    owner = torch.randint(0, num_shards, (num_keys,), generator=gen)
    if empty_shard:
        owner[owner == num_shards - 1] = 0
    return [torch.nonzero(owner == i).flatten() for i in range(num_shards)]


def _sharded_attention(q, k, v, scale, shards):
    outs, lses = [], []
    for idx in shards:
        o, lse = attention_with_lse(q, k[:, idx], v[:, idx], None, scale)
        outs.append(o[0])
        lses.append(lse[0])
    return merge_attn_states(torch.stack(outs), torch.stack(lses))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("num_shards,empty_shard", [(2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_merge_over_disjoint_shards_equals_full_attention(num_shards, empty_shard, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(1000 * num_shards + 10 * num_heads + empty_shard)
    num_q, num_keys, head_dim = 5, 97, 32
    q = torch.randn(1, num_q, num_heads, head_dim, generator=gen)
    k = torch.randn(1, num_keys, num_kv_heads, head_dim, generator=gen) * 2
    v = torch.randn(1, num_keys, num_kv_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    shards = _shards(num_keys, num_shards, empty_shard, gen)
    assert sum(len(s) for s in shards) == num_keys
    assert (min(len(s) for s in shards) == 0) == empty_shard

    out, lse = _sharded_attention(q, k, v, scale, shards)
    ref_out, ref_lse = attention_with_lse(q.double(), k.double(), v.double(), None, scale)

    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert _rel(out, ref_out[0]) < 1e-5
    assert (lse.double() - ref_lse[0]).abs().max().item() < 1e-5


def test_merge_of_only_empty_shards_gives_zeros_and_neg_inf_lse():
    outs = torch.full((3, 2, 4, 8), float("nan"))
    lses = torch.full((3, 2, 4), float("-inf"))
    out, lse = merge_attn_states(outs, lses)
    assert torch.equal(out, torch.zeros(2, 4, 8))
    assert torch.isneginf(lse).all()


def test_merge_ignores_an_empty_shards_output_even_if_nan():
    gen = torch.Generator().manual_seed(7)
    outs = torch.randn(2, 3, 2, 16, generator=gen)
    lses = torch.randn(2, 3, 2, generator=gen)
    outs[1] = float("nan")
    lses[1] = float("-inf")
    out, lse = merge_attn_states(outs, lses)
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])


def test_merge_keeps_bfloat16_outputs_in_bfloat16():
    outs = torch.randn(2, 3, 2, 16).bfloat16()
    lses = torch.randn(2, 3, 2)
    out, lse = merge_attn_states(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
