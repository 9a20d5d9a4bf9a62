"""The decoder-only transformer for every supported family (llama, mistral, qwen2, qwen3).

Read top to bottom, gpt-fast style: embedding -> N x (RMSNorm, attention, RMSNorm, SwiGLU MLP) ->
RMSNorm; ``compute_logits`` applies the (possibly tied) LM head. The families differ only in two
switches read from ModelConfig: a bias on q/k/v (Qwen2) and a per-head RMSNorm on q and k before
RoPE (Qwen3).

A step's tokens come flattened, ``[num_tokens]`` with their positions, so prefill chunks and
decodes of many requests run as one batch; attention reads and writes the paged KV cache through
the backend handed in with the step's AttentionMetadata. q/k/v and gate/up are each one Linear
(the loader fuses HF's separate weights): fewer, larger matmuls per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with ``residual``: (norm(x + residual), x + residual), the fused kernel
        updating ``residual`` in place."""
        if self.fused:
            from engine.kernels.rms_norm import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, scale in the model dtype: HF's order, so bf16 outputs match it.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        layer_cache = kv_cache[:, self.layer_idx]
        if self.fused:
            from engine.kernels.rope_kv_write import rope_kv_write

            qk = self.q_norm is not None
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if qk else (None, None, 0.0)
            q, k, v = rope_kv_write(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                                    layer_cache, meta.slot_mapping, *norms)
        else:
            q, k, v = self._rope(self.qkv_proj(x), cos, sin)
            backend.write_kv(k, v, layer_cache, meta)
        out, _lse = backend.forward(q, layer_cache, meta, self.scale, key=k, value=v, return_lse=False)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from engine.kernels.silu_mul import silu_mul

            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, x, residual, cos, sin, kv_cache, meta, backend):
        """x: the previous layer's output, residual: the stream before it (None for layer 0).
        Returns this layer's (output, residual stream); adding them happens in the next norm."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def reset_buffers(self) -> None:
        """Recompute state that no checkpoint holds (RoPE frequencies) after ``to_empty``."""
        self.rotary.reset_buffers()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: long [T] -> final-normed hidden states [T, hidden_size]."""
        x, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, backend)
        return self.norm(x, residual)[0]

    def use_fused_kernels(self, enabled: bool) -> None:
        """Route RMSNorm(+residual), RoPE(+qk-norm)+KV write and SiLU*mul through the Triton
        kernels of ``engine.kernels`` (CUDA only); off, the torch expressions run (the reference)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.fused = enabled

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size]."""
        return F.linear(hidden, self.lm_head_weight).float()
