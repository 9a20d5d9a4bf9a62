"""Engine settings: one dataclass, resolved against the model and the machine at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None  # HF-format directory, preset:NAME, or None = the bundled SmolLM2-135M-Instruct
    load_format: str = "auto"  # auto | safetensors | dummy (random weights, for benchmarks)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's total memory this engine may use
    kv_cache_bytes: int | None = None  # KV budget in bytes (CPU default: 1 GiB)
    num_kv_blocks: int | None = None  # exact block count; overrides both budgets (tests)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # torch | triton
    enforce_eager: bool = False  # no CUDA graphs
    fused_kernels: bool = True  # Triton RMSNorm / RoPE+KV write / SiLU*mul with the triton backend
    seed: int = 0
    kv_events_config: dict | None = None  # vLLM's kv_events_config (engine/kv_events.py); None: no events

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: expected one of float32, bfloat16, float16")
        return _DTYPES[self.dtype]

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        self.torch_dtype()
