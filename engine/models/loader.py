"""Loading a checkpoint: an HF-format directory (config.json + safetensors) into a DecoderForCausalLM.

The model is built on the meta device and given uninitialised storage on the target device, so no
time goes into a random init that the checkpoint overwrites. Each HF tensor is then copied straight
into its slice of our parameters — q/k/v into rows of ``qkv_proj``, gate/up into rows of
``gate_up_proj`` — converting dtype and moving to the device in that one copy. Every expected
tensor must be found exactly once with the expected shape, or loading fails naming it.

``load_format="dummy"`` (and a preset directory, which holds only config.json) gets random
weights instead: benchmarks on real shapes without a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.models.config import ModelConfig
from engine.models.decoder import DecoderForCausalLM

PRESET_MARKER = "kvfabric_preset.json"  # written beside config.json by resolve_model_path("preset:NAME")
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def expected_weights(cfg: ModelConfig) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """HF tensor name -> (our parameter name, first row in it, HF shape)."""
    out: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out["model.embed_tokens.weight"] = ("embed_tokens.weight", 0, (cfg.vocab_size, h))
    out["model.norm.weight"] = ("norm.weight", 0, (h,))
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, (cfg.vocab_size, h))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            tail = (h,) if kind == "weight" else ()
            out[hf + f"self_attn.q_proj.{kind}"] = (ours + f"self_attn.qkv_proj.{kind}", 0, (q, *tail))
            out[hf + f"self_attn.k_proj.{kind}"] = (ours + f"self_attn.qkv_proj.{kind}", q, (kv, *tail))
            out[hf + f"self_attn.v_proj.{kind}"] = (ours + f"self_attn.qkv_proj.{kind}", q + kv, (kv, *tail))
        out[hf + "self_attn.o_proj.weight"] = (ours + "self_attn.o_proj.weight", 0, (h, q))
        if cfg.o_bias:
            out[hf + "self_attn.o_proj.bias"] = (ours + "self_attn.o_proj.bias", 0, (h,))
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = (ours + "self_attn.q_norm.weight", 0, (cfg.head_dim,))
            out[hf + "self_attn.k_norm.weight"] = (ours + "self_attn.k_norm.weight", 0, (cfg.head_dim,))
        out[hf + "mlp.gate_proj.weight"] = (ours + "mlp.gate_up_proj.weight", 0, (inter, h))
        out[hf + "mlp.up_proj.weight"] = (ours + "mlp.gate_up_proj.weight", inter, (inter, h))
        out[hf + "mlp.down_proj.weight"] = (ours + "mlp.down_proj.weight", 0, (h, inter))
        out[hf + "input_layernorm.weight"] = (ours + "input_layernorm.weight", 0, (h,))
        out[hf + "post_attention_layernorm.weight"] = (ours + "post_attention_layernorm.weight", 0, (h,))
    return out


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"weight shard {f.name} listed in {index} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}: convert to safetensors)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weight files in {path}{hint}")
    return files


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> DecoderForCausalLM:
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, dtype)
    model.to_empty(device=device)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def _load_safetensors(model: DecoderForCausalLM, cfg: ModelConfig, path: Path) -> None:
    expected = expected_weights(cfg)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        # Tied checkpoints may still carry lm_head; rotary caches of old exports too.
                        continue
                    target, row, shape = expected[name]
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != shape:
                        raise ValueError(f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, "
                                         f"expected {shape} for {cfg.family} config in {path}")
                    params[target][row: row + shape[0]].copy_(tensor)
                    seen.add(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read weight file {file} (corrupt or truncated?): {e}") from None
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path} is missing tensor(s) {', '.join(missing[:5])}{more}")


@torch.no_grad()
def init_random_weights(model: DecoderForCausalLM, std: float = 0.02, seed: int = 0) -> None:
    """HF-style init (normal weights, unit norms, zero biases), generated on the model's device."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


@torch.no_grad()
def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               load_format: str = "auto") -> tuple[DecoderForCausalLM, ModelConfig]:
    """Build the model for ``path`` (an HF-format directory) with its weights, ready for inference."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}: expected float32, bfloat16 or float16")
    path = Path(path)
    cfg = ModelConfig.from_pretrained_dir(path)
    model = _empty_model(cfg, dtype, torch.device(device))
    if load_format == "dummy" or (load_format == "auto" and (path / PRESET_MARKER).is_file()):
        init_random_weights(model, std=float(cfg.hf_config.get("initializer_range", 0.02)))
    else:
        _load_safetensors(model, cfg, path)
    return model, cfg
