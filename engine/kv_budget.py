"""How many bytes of KV cache an engine may allocate on its GPU.

The budget is this engine's share of the GPU's *total* memory minus what this engine itself
already holds (weights, the allocator's cache) and a reserve for what it will still need
(activations of a full step, CUDA graphs, the CUDA context, which torch does not count):

    budget = total × gpu_memory_utilization − own − reserve

It never depends on what other processes hold at that moment, so two engines that share a GPU
and start together (prefill and decode under ``kvfabric up``) each get their own fraction, in
either order. Only when the GPU has less free than the budget (another process took more than
its share) is the budget cut to what is free, with a warning naming the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Beyond the activations: the CUDA context, cuBLAS workspaces, Triton and graph pools (measured
# at ~0.6 GiB per process on an H200; rounded up).
NON_TORCH_RESERVE = 1 * GiB


@dataclass(frozen=True)
class GPUMemory:
    total: int  # bytes of the whole device
    free: int  # bytes free on the device now (every process counted)
    own: int  # bytes this process holds through torch (reserved: weights, cached blocks)


def activation_bytes(num_tokens: int, hidden_size: int, intermediate_size: int, vocab_size: int,
                     num_seqs: int, itemsize: int) -> int:
    """A generous bound on one step's live activations: a few hidden-size tensors, the MLP's
    gate/up output and its product, and float32 logits for every sequence."""
    per_token = (6 * hidden_size + 3 * intermediate_size) * itemsize
    return num_tokens * per_token + num_seqs * vocab_size * 4


def kv_budget_bytes(mem: GPUMemory, utilization: float, activations: int,
                    reserve: int = NON_TORCH_RESERVE) -> int:
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(mem.total * utilization) - mem.own - activations - reserve
    available = mem.free - activations - reserve
    if budget > available:
        logger.warning("KV budget %.2f GiB (%.0f%% of %.1f GiB, less %.2f GiB this engine holds) exceeds the "
                       "%.2f GiB free now: other processes on this GPU use more than their share; taking %.2f GiB",
                       budget / GiB, 100 * utilization, mem.total / GiB, mem.own / GiB, mem.free / GiB,
                       max(available, 0) / GiB)
        budget = available
    return max(budget, 0)
