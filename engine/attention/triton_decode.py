"""Paged decode attention (one query token per sequence), flash-decoding style.

Grid ``(batch, num_kv_heads, num_splits)``: each program takes one KV head of one sequence and
one contiguous slice of its context, and computes every query head of that KV head's GQA group
at once, so each K/V tile is read from memory once per group rather than once per query head.
The group (padded to 16 rows, the smallest tensor-core tile) is the M side of ``tl.dot``.

``num_splits`` is chosen on the host from shapes alone (batch, heads, the block table's width,
the SM count), never from ``seq_lens``: the grid is the same on every step of a given batch
shape, so the call can be captured in a CUDA graph. Each program divides its sequence's actual
length into ``num_splits`` slices of whole tiles at run time; a slice past the end writes an
empty partial (lse = -inf) that the merge weighs by zero.

With one split the kernel writes the final output directly; otherwise it writes float32
partials and their natural-log LSE, and a second kernel merges them exactly per (token, head).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # split until the grid covers the SMs this many times over
TILE = dict(BLOCK_N=64, num_warps=4, num_stages=3)  # keys per tile; bench/attention_kernels.py --sweep tunes it


@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, lse_ptr,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain inside the kernel
    num_splits,  # a run-time value: a new split count reuses the compiled kernel
    stride_qt, stride_qh,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh, stride_ls,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_ch + offs_d[None, :]
    table = block_tables_ptr + seq64 * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + row[:, None], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_ckv + row[:, None], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + seq64 * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_plt, stride_plh, stride_ot, stride_oh, stride_lt, stride_lh,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lses = tl.load(part_lse_ptr + seq * stride_plt + head * stride_plh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lses, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lses - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(part_out_ptr + seq * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    nonempty = total > 0.0
    out = tl.sum(parts * w[:, None], 0) / tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + seq * stride_lt + head * stride_lh, lse)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 64  # the interpreter on CPU: any number exercises the split path


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int, num_sms: int) -> int:
    """From shapes only (CUDA-graph safe): none when batch x KV heads fills the SMs already, else
    enough splits to cover the SMs PROGRAMS_PER_SM times over.

    Capped by the number of key tiles the block table can hold, so no slice is empty on the
    longest sequence that the table allows, and by MAX_SPLITS, which bounds the merge's work.
    """
    if batch * num_kv_heads >= num_sms:
        return 1  # a full wave without splitting: measured faster than paying for partials and a merge
    max_tiles = max(1, math.ceil(max_blocks_per_seq * block_size / TILE["BLOCK_N"]))
    want = math.ceil(PROGRAMS_PER_SM * num_sms / (batch * num_kv_heads))
    return max(1, min(want, max_tiles, MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, Hq, D]; layer_cache [num_blocks, 2, block_size, Hkv, D]; block_tables [B, W] int32;
    seq_lens [B] int32 (0 allowed: out 0, lse -inf) -> out [B, Hq, D] (query's dtype), lse [B, Hq] float32."""
    batch, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    if out is None:
        out = torch.empty_like(query)
    if lse is None:
        lse = torch.empty(batch, num_heads, dtype=torch.float32, device=query.device)
    if batch == 0:
        return out, lse
    if query.stride(-1) != 1 or layer_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs unit stride along head_dim")
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, _num_sms(query.device))
    block_d = triton.next_power_of_2(head_dim)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    common = dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
                  BLOCK_SIZE=block_size, DOT_PRECISION=precision, **TILE)
    grid = (batch, num_kv_heads, num_splits)
    cache_strides = (layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3))
    if num_splits == 1:
        _decode_split_kernel[grid](
            query, layer_cache, block_tables, seq_lens, out, lse, scale * LOG2E, 1,
            query.stride(0), query.stride(1), *cache_strides, block_tables.stride(0),
            out.stride(0), out.stride(1), 0, lse.stride(0), lse.stride(1), 0, **common,
        )
        return out, lse
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
    _decode_split_kernel[grid](
        query, layer_cache, block_tables, seq_lens, part_out, part_lse, scale * LOG2E, num_splits,
        query.stride(0), query.stride(1), *cache_strides, block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), **common,
    )
    _merge_splits_kernel[(batch, num_heads)](
        part_out, part_lse, out, lse, num_splits,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
        num_warps=4,
    )
    return out, lse
