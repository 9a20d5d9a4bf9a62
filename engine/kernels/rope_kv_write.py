"""From the qkv projection to attention's inputs in one kernel: (Qwen3's per-head RMSNorm of q and
k,) neox RoPE on q and k, and the write of k and v into the paged KV cache.

Unfused, this is ~20 launches per layer (float casts, chunk, cat, multiply-adds, the cache write),
which is most of a small-batch decode step. One program handles one token, all its heads.
Rotated q goes to a new contiguous tensor; rotated k is also written back into the qkv buffer, so
the caller's k view holds what went into the cache (a prefill with no cached context reads it
directly). cos/sin are the model's own float32 tables for the step (``RotaryEmbedding``), so the
rotation is HF's arithmetic; only their first half is read (the second repeats it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_norm(x1, x2, w_ptr, offs_d, d_mask, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """Per-row RMSNorm of [heads, HALF] halves, rounded like the torch RMSNorm module."""
    dtype = w_ptr.dtype.element_ty
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    y1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr, q_out_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, cache_ptr, slot_ptr,
    stride_t, stride_qo_t, stride_qo_h, stride_cos_t, stride_sin_t,
    stride_cb, stride_ckv, stride_ct, stride_ch, num_slots, eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + t * stride_cos_t + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * stride_sin_t + offs_d, mask=d_mask, other=0.0)[None, :]
    row = qkv_ptr + t * stride_t

    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < NUM_HEADS) & d_mask[None, :]
    src = row + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    q1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        q1, q2 = _head_norm(q1, q2, q_norm_ptr, offs_d, d_mask, eps, HEAD_DIM, HALF)
    dst = q_out_ptr + t * stride_qo_t + offs_h[:, None] * stride_qo_h + offs_d[None, :]
    tl.store(dst, (q1 * cos - q2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (q2 * cos + q1 * sin).to(dtype), mask=mask)

    offs_k = tl.arange(0, BLOCK_KV)
    kmask = (offs_k[:, None] < NUM_KV_HEADS) & d_mask[None, :]
    ksrc = row + NUM_HEADS * HEAD_DIM + offs_k[:, None] * HEAD_DIM + offs_d[None, :]
    k1 = tl.load(ksrc, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(ksrc + HALF, mask=kmask, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = _head_norm(k1, k2, k_norm_ptr, offs_d, d_mask, eps, HEAD_DIM, HALF)
    r1 = (k1 * cos - k2 * sin).to(dtype)
    r2 = (k2 * cos + k1 * sin).to(dtype)
    tl.store(ksrc, r1, mask=kmask)
    tl.store(ksrc + HALF, r2, mask=kmask)

    slot = tl.load(slot_ptr + t, mask=t < num_slots, other=-1).to(tl.int64)
    if slot >= 0:
        vsrc = ksrc + NUM_KV_HEADS * HEAD_DIM
        v1 = tl.load(vsrc, mask=kmask, other=0.0)
        v2 = tl.load(vsrc + HALF, mask=kmask, other=0.0)
        cdt = cache_ptr.dtype.element_ty
        cdst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct \
            + offs_k[:, None] * stride_ch + offs_d[None, :]
        tl.store(cdst, r1.to(cdt), mask=kmask)
        tl.store(cdst + HALF, r2.to(cdt), mask=kmask)
        tl.store(cdst + stride_ckv, v1.to(cdt), mask=kmask)
        tl.store(cdst + stride_ckv + HALF, v2.to(cdt), mask=kmask)


def rope_kv_write(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    cos: torch.Tensor, sin: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) * D] (q, k, v heads in that order); cos/sin float32 [T, 1, D];
    layer_cache [num_blocks, 2, block_size, Hkv, D]; slot_mapping [T'] (-1 = skip).

    Returns (q [T, Hq, D] new and contiguous, k, v [T, Hkv, D] views into ``qkv``, k rotated in
    place); k and v are stored at their slots. ``q_norm``/``k_norm``: per-head RMSNorm weights.
    """
    if head_dim % 2:
        raise ValueError("RoPE needs an even head_dim")
    tokens = qkv.shape[0]
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rope_kv_write needs unit stride along the last dimension")
    q_out = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    k = qkv[:, q_size: q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim)
    if layer_cache.stride(-1) != 1:
        raise ValueError("rope_kv_write needs unit stride along the cache's head_dim")
    if tokens == 0:
        return q_out, k, v
    qk_norm = q_norm is not None
    half = head_dim // 2
    # Tokens past the slot mapping (a padded batch) are rotated but never stored.
    _rope_kv_write_kernel[(tokens,)](
        qkv, q_out, cos, sin, q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, layer_cache, slot_mapping,
        qkv.stride(0), q_out.stride(0), q_out.stride(1), cos.stride(0), sin.stride(0),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        slot_mapping.shape[0], eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=layer_cache.shape[2],
        QK_NORM=qk_norm, num_warps=4,
    )
    return q_out, k, v
