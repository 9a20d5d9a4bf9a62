"""Writing this step's K and V into the paged KV cache: one program per token, -1 slots skipped.

The copy moves bytes unchanged when the cache has the inputs' dtype (the test checks it byte for
byte). The grid is sized from tensor shapes only, so the write can be captured in a CUDA graph;
padded tokens must carry slot -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = cache_ptr + block * stride_cb + offset * stride_ct + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value [T, H, D]; layer_cache [num_blocks, 2, block_size, H, D] (any block stride);
    slot_mapping [>=T'] int: block_id * block_size + offset, -1 = skip. Writes min(T, T') tokens."""
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    _, _, block_size, num_heads, head_dim = layer_cache.shape
    for t in (key, value, layer_cache):
        if t.stride(-1) != 1:
            raise ValueError("write_kv needs unit stride along head_dim")
    _write_kv_kernel[(num_tokens,)](
        key, value, layer_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        num_warps=4,
    )
