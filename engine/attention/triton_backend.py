"""The GPU attention backend: Triton kernels for the KV write, decode and prefill.

Decodes (the first ``num_decodes`` requests, one token each) go to the flash-decoding kernel,
the rest of the batch to the varlen paged prefill kernel. A step of fresh prompts only (no
cached context, no decodes) whose caller needs no lse goes to PyTorch's fused attention over the
step's own K/V instead: for a whole prompt it is the faster kernel (1.47x ours at 8k tokens on the
H100, docs/kernels.md) and the pages need no gathering. Nothing here reads a device tensor on
the host. On a decode-only step every size comes from tensor shapes (the batch is
``seq_lens.shape[0]``, the splits from the block table's width), so a runner that pads the
batch to a captured size — padded rows with ``seq_len`` 0, padded slots -1 — can replay the
step as a CUDA graph; padded rows come back as zeros with lse -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.triton_decode import paged_decode_attention
from engine.attention.triton_kv_write import write_kv
from engine.attention.triton_prefill import paged_prefill_attention


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        write_kv(key, value, layer_cache, meta.slot_mapping)

    def forward(self, query: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not return_lse and key is not None and meta.num_decodes == 0 \
                and meta.query_lens_cpu == meta.seq_lens_cpu:
            return _fresh_prefill(query, key, value, meta.query_lens_cpu, scale), None
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[0], query.shape[1], dtype=torch.float32, device=query.device)
        nd = meta.num_decodes
        if nd == meta.num_reqs:
            b = min(query.shape[0], meta.seq_lens.shape[0])
            paged_decode_attention(query[:b], layer_cache, meta.block_tables[:b], meta.seq_lens[:b], scale,
                                   out=out[:b], lse=lse[:b])
            return out, lse
        if nd:
            paged_decode_attention(query[:nd], layer_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                                   out=out[:nd], lse=lse[:nd])
        paged_prefill_attention(query, layer_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                                first_req=nd, num_reqs=meta.num_reqs - nd, max_query_len=meta.max_query_len,
                                out=out, lse=lse)
        return out, lse


def _fresh_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lens: list[int],
                   scale: float) -> torch.Tensor:
    """Causal attention of each prompt over itself, one SDPA call per prompt (a prefill step holds
    a handful). Inputs are strided [T, H, D] views; SDPA takes them as [1, H, S, D] unchanged."""
    if len(lens) == 1:  # the whole step is one prompt: no copy into a shared output
        return F.scaled_dot_product_attention(
            query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    out = torch.empty_like(query)
    s = 0
    for n in lens:
        e = s + n
        o = F.scaled_dot_product_attention(
            query[s:e].transpose(0, 1)[None], key[s:e].transpose(0, 1)[None], value[s:e].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
        s = e
    return out
