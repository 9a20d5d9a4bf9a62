"""ModelConfig: the shape of a decoder-only model, read from an HF ``config.json``, plus named presets.

One dataclass covers the four supported families (llama, mistral, qwen2, qwen3); the family only
decides defaults and two switches (Qwen2's qkv bias, Qwen3's per-head q/k norm). Both the
transformers-4 keys (``rope_theta`` / ``rope_scaling``) and the transformers-5 key
(``rope_parameters``) are understood, so checkpoints saved by either load the same.

Presets are HF config dicts, gpt-fast style: ``tiny-*`` for tests (random weights, CPU), and real
shapes (``llama-3.1-8b``, ``qwen3-0.6b``) for GPU benchmarks with random bf16 weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# HF architecture class -> our family; model_type is the fallback when `architectures` is absent.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Where a key is absent, transformers falls back to the family's class default; so do we.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768},
}
_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (Llama 3.1+); ``None`` on ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k, before RoPE
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Names the weights, not just the shape: it seeds every block hash, so two checkpoints must
    # never share one (see from_pretrained_dir).
    model_id: str
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], model_id: str | None = None) -> ModelConfig:
        family = _family(d)
        g = {**_FAMILY_DEFAULTS[family], **d}.get
        if g("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {g('hidden_act')!r}: only silu (SwiGLU) is implemented")
        if g("mlp_bias", False):
            raise ValueError("unsupported config: mlp_bias=true")
        num_heads = int(g("num_attention_heads"))
        hidden = int(g("hidden_size"))
        attention_bias = bool(g("attention_bias") or False)
        eos = g("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        theta, scaling = _rope(d)
        max_pos = int(g("max_position_embeddings"))
        window = g("sliding_window") if family == "mistral" or g("use_sliding_window", False) else None
        if window is not None and int(window) < max_pos:
            # No backend implements a sliding window; within the window it equals full causal
            # attention, so serving stays exact by never going past it.
            logger.warning("sliding_window=%s: limiting max_position_embeddings from %d to %s",
                           window, max_pos, window)
            max_pos = int(window)
        return cls(
            family=family,
            vocab_size=int(g("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(g("intermediate_size")),
            num_layers=int(g("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(g("num_key_value_heads") or num_heads),
            head_dim=int(g("head_dim") or hidden // num_heads),
            rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(g("tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v (not on o); elsewhere attention_bias covers all four.
            qkv_bias=True if family == "qwen2" else attention_bias and family != "mistral",
            o_bias=attention_bias and family in ("llama", "qwen3"),
            qk_norm=family == "qwen3",
            bos_token_id=g("bos_token_id"),
            eos_token_ids=eos_ids,
            model_id=model_id or str(g("_name_or_path") or family),
            hf_config=copy.deepcopy(d),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        raw = cfg_file.read_bytes()
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls.from_hf_config(d, model_id=f"{path.name}@{weights_fingerprint(path, raw)}")

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls.from_hf_config(PRESETS[name], model_id=f"preset:{name}")

    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + self.hidden_size * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + self.hidden_size

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and benchmark reports."""
        d = asdict(self)
        d.pop("hf_config")
        d["num_parameters"] = self.num_parameters()
        return d


def _family(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = d.get("model_type")
    if not archs and model_type in SUPPORTED_FAMILIES:
        return model_type
    name = ", ".join(archs) if archs else f"model_type={model_type!r}"
    raise ValueError(f"unsupported architecture {name}; supported: "
                     f"{', '.join(_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_FAMILIES)})")


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 folds theta and scaling into rope_parameters; 4 keeps them apart.
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported config: partial_rotary_factor != 1")
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def weights_fingerprint(path: Path, config_bytes: bytes) -> str:
    """A short digest of the config and the weight files, cheap enough to take at every start.

    Hashing every byte of a 16 GB checkpoint would take longer than loading it; the config, each
    file's safetensors header (names, shapes, offsets), size and its first and last MiB still tell
    apart different checkpoints of one shape, including two random inits with different seeds.
    """
    h = hashlib.sha256(config_bytes)
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:12]


def _tiny(model_type: str, arch: str, **extra: Any) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "hidden_act": "silu",
        # Far above the usual 0.02 so a random 2-layer model has peaked logits and its greedy
        # tokens do not hinge on float noise.
        "initializer_range": 0.15, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **extra,
    }


TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": _tiny("llama", "LlamaForCausalLM", num_hidden_layers=3, tie_word_embeddings=True),
    "tiny-llama3": _tiny("llama", "LlamaForCausalLM", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tiny-mistral": _tiny("mistral", "MistralForCausalLM", sliding_window=None, num_key_value_heads=1),
    "tiny-qwen2": _tiny("qwen2", "Qwen2ForCausalLM", eos_token_id=[2, 3], bos_token_id=None,
                        use_sliding_window=False, sliding_window=None),
    # head_dim 32 with hidden 64 and 4 heads: the explicit head_dim must win over hidden // heads.
    "tiny-qwen3": _tiny("qwen3", "Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True,
                        attention_bias=False, eos_token_id=[2, 3], use_sliding_window=False,
                        sliding_window=None),
}

# Real shapes for GPU benchmarks with random weights (no checkpoint needed).
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}

PRESETS: dict[str, dict[str, Any]] = {**TINY_CONFIGS, **BENCH_CONFIGS}
