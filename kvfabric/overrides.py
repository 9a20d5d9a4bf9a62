"""Command-line flags shared by ``up`` and ``serve``: a config file, then flags that override it."""

from __future__ import annotations

import argparse
import json

from kvfabric.config import KVFabricConfig

_ENGINE_FLAGS = {  # flag -> (EngineSection field, type)
    "--block-size": ("block_size", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-model-len": ("max_model_len", int),
    "--kv-cache-bytes": ("kv_cache_bytes", int),
    "--num-kv-blocks": ("num_kv_blocks", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
    "--attention-backend": ("attention_backend", str),
}

_LIMIT_FLAGS = {  # flag -> (ProxySection field, help)
    "--max-body-bytes": ("max_body_bytes", "largest request body in bytes, else 413"),
    "--max-concurrent-per-key": ("max_concurrent_per_key", "in-flight requests per API key, else 429"),
    "--max-queued-prompt-tokens": ("max_queued_prompt_tokens", "prompt tokens of unfinished requests, else 429"),
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see kvfabric.example.yaml)")
    p.add_argument("--model", default=None, help="HF-format model directory (default: bundled SmolLM2)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--kv-connector", default=None, help="connector name, e.g. zmq")
    p.add_argument("--kv-transfer-config", default=None, help="vLLM-style JSON: {\"kv_connector\": ...}")
    p.add_argument("--dcp-size", type=int, default=None, help="decode context parallel ranks")
    p.add_argument("--api-key", default=None, help="require this bearer token at the proxy")
    for flag, (_, kind) in _ENGINE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None)
    for flag, (_, help_text) in _LIMIT_FLAGS.items():
        p.add_argument(flag, type=int, default=None, help=f"proxy: {help_text} (0: no limit)")
    p.add_argument("--no-prefix-caching", action="store_true")


def apply_config_flags(cfg: KVFabricConfig, args: argparse.Namespace) -> KVFabricConfig:
    for name in ("model", "dtype", "device"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    if getattr(args, "kv_transfer_config", None):
        try:
            cfg.kv_transfer_config = json.loads(args.kv_transfer_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-transfer-config is not valid JSON: {e}") from None
    if getattr(args, "kv_connector", None):
        cfg.kv_transfer_config = {**cfg.kv_transfer_config, "kv_connector": args.kv_connector}
    if getattr(args, "dcp_size", None):
        cfg.decode.dcp_size = args.dcp_size
    if getattr(args, "api_key", None):
        cfg.proxy.api_key = args.api_key
    for flag, (field_name, _) in _ENGINE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            setattr(cfg.engine, field_name, value)
    for flag, (field_name, _) in _LIMIT_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            setattr(cfg.proxy, field_name, value)
    if getattr(args, "no_prefix_caching", False):
        cfg.engine.enable_prefix_caching = False
    return cfg
