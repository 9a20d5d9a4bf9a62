"""The attention backend interface and the per-step metadata every backend reads.

KV cache layout (the whole engine's, and every connector's): one tensor per engine,
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` — block-major, so the K and V
of every layer of one block are one contiguous run of bytes and a transfer moves a block with a
single descriptor. A layer sees the view ``kv_cache[:, layer]`` of shape
``[num_blocks, 2, block_size, num_kv_heads, head_dim]``. Block 0 is the null block: padding in
block tables points at it and nothing real is ever stored there.

A step's tokens are flattened: ``[num_tokens, heads, head_dim]``. Requests are ordered decodes
first (exactly one query token each), then prefill chunks, so kernels can split the batch at
``num_decodes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int  # real tokens, before any CUDA-graph padding
    num_decodes: int  # the first num_decodes requests have one query token each
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], cumulative query lengths
    seq_lens: torch.Tensor  # int32 [num_reqs], context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks], padded with the null block 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], block_id * block_size + offset; -1 = skip
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    name: str = "abstract"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    @abstractmethod
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store this step's K and V ([num_tokens, num_kv_heads, head_dim]) at ``meta.slot_mapping``."""

    @abstractmethod
    def forward(
        self, query: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        key: torch.Tensor | None = None, value: torch.Tensor | None = None, return_lse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of each query token over its request's cached context.

        Returns ``(out [num_tokens, num_heads, head_dim] in query's dtype,
        lse [num_tokens, num_heads] float32)`` where lse is the natural-log log-sum-exp of the
        scaled scores, so partial results over disjoint KV shards merge exactly. With
        ``return_lse=False`` a backend may return None for lse. ``key``/``value``
        ([num_tokens, num_kv_heads, head_dim]) are this step's keys and values, already written to
        the cache; a backend may read them directly where no request has earlier context.
        """


def get_attention_backend(name: str, block_size: int, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(block_size)
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention backend 'triton' needs a CUDA device; use 'torch' on CPU")
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(block_size)
    raise ValueError(f"unknown attention backend {name!r}: expected 'auto', 'torch' or 'triton'")
