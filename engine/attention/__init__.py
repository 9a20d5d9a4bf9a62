"""Attention backends: the interface, the torch reference (CPU and GPU) and the Triton kernels (GPU).

Every backend reads and writes the paged KV cache in the engine's one layout and returns the
log-sum-exp beside the output, so partial attention over a shard of the KV (decode context
parallelism) can be merged exactly.
"""

from engine.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
