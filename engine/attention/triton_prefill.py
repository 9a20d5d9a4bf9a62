"""Paged prefill attention: varlen causal queries over keys read through the block table.

One program per (request, tile of BLOCK_M query tokens, query head), the tiles deepest into the
prompt first (optionally one per KV head, the group's heads packed into the tile's rows: PACK_GQA).
A request's queries are the last ``query_len`` positions of its ``seq_len`` tokens, so a plain
prompt, a later chunk of a chunked prefill and a prompt whose prefix came from the prefix cache
(or another engine) are the same computation: every key comes from the paged cache, which
``write_kv`` filled first.

Keys below the tile's first query position are visible to every row of the tile, so that part
of the loop runs without masks; only the tiles that cross the diagonal apply the causal mask.
Online softmax in the log2 domain, float32 accumulators; lse is returned in natural log.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_base, table, n0, q_pos, seq_len, qk_scale, offs_n, d_mask,
                 stride_cb, stride_ckv, stride_ct,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pos = n0 + offs_n
    if MASKED:
        n_mask = pos < seq_len
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct
    if MASKED:
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + row[:, None], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_ckv + row[:, None], mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_base + row[:, None], mask=d_mask[None, :], other=0.0)
        v = tl.load(k_base + stride_ckv + row[:, None], mask=d_mask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row can meet a fully masked tile only after it has seen key 0, so m_new is finite for
    # real rows; the guard keeps padded rows (never stored) free of inf - inf as well.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, lse_ptr,
    qk_scale, first_req,
    stride_qt, stride_qh,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PACK_GQA: tl.constexpr, TOKENS: tl.constexpr,  # TOKENS: query tokens per tile (BLOCK_M / GROUP if packed)
):
    req = first_req + tl.program_id(0)
    # Causal tiles further down a prompt have more keys: hand them out first, so the last wave
    # is made of short tiles rather than one long one.
    m_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * TOKENS
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # keys before the first query: cached prefix or earlier chunks

    offs_r = tl.arange(0, BLOCK_M)
    if PACK_GQA:  # rows are (token, head of the group) pairs: one K/V tile serves the whole group
        kv_head = tl.program_id(2)
        offs_m = m_start + offs_r // GROUP
        heads = kv_head * GROUP + offs_r % GROUP
    else:
        kv_head = tl.program_id(2) // GROUP
        offs_m = m_start + offs_r
        heads = tl.program_id(2) + offs_r * 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = context + offs_m
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_ch + offs_d[None, :]
    table = block_tables_ptr + req.to(tl.int64) * stride_bt

    first_pos = context + m_start
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # every key below is visible to every row
    end = tl.minimum(seq_len, first_pos + TOKENS)
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, table, n0, q_pos, seq_len, qk_scale, offs_n, d_mask,
                                     stride_cb, stride_ckv, stride_ct, BLOCK_SIZE, False, DOT_PRECISION)
    for n0 in range(unmasked_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, table, n0, q_pos, seq_len, qk_scale, offs_n, d_mask,
                                     stride_cb, stride_ckv, stride_ct, BLOCK_SIZE, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + tokens * stride_lt + heads * stride_lh, lse, mask=m_mask)


# PACK_GQA: a tile's rows are BLOCK_M / GROUP tokens x the GROUP query heads of one KV head, so
# K/V tiles are fetched once per group instead of once per query head.
TILE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, PACK_GQA=False)  # 16-bit, head_dim <= 128; --sweep
TILE_LARGE = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, PACK_GQA=False)  # float32 or head_dim > 128


def _config(dtype: torch.dtype, head_dim: int) -> dict:
    return TILE_LARGE if dtype == torch.float32 or head_dim > 128 else TILE


def paged_prefill_attention(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    first_req: int,
    num_reqs: int,
    max_query_len: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Requests ``first_req .. first_req + num_reqs - 1`` of the batch; their tokens' rows of
    ``out`` [T, Hq, D] and ``lse`` [T, Hq] are written, addressed through ``query_start_loc``.

    query [T, Hq, D]; layer_cache [num_blocks, 2, block_size, Hkv, D]; block_tables [R, W] int32;
    seq_lens [R] int32 (context including these queries); query_start_loc [R + 1] int32.
    ``max_query_len`` (a host int, an upper bound is fine) sizes the grid.
    """
    if num_reqs == 0 or max_query_len == 0:
        return out, lse
    _, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    if query.stride(-1) != 1 or layer_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("paged_prefill_attention needs unit stride along head_dim")
    cfg = dict(_config(query.dtype, head_dim))
    group = num_heads // num_kv_heads
    pack = cfg.pop("PACK_GQA") and group > 1 and cfg["BLOCK_M"] % group == 0
    tokens = cfg["BLOCK_M"] // group if pack else cfg["BLOCK_M"]
    grid = (num_reqs, triton.cdiv(max_query_len, tokens), num_kv_heads if pack else num_heads)
    _prefill_kernel[grid](
        query, layer_cache, block_tables, seq_lens, query_start_loc, out, lse, scale * LOG2E, first_req,
        query.stride(0), query.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        GROUP=group, PACK_GQA=pack, TOKENS=tokens, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", **cfg,
    )
    return out, lse
