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
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),  # of total GPU memory, per engine
    "--attention-backend": ("attention_backend", str),
}

_LIMIT_FLAGS = {  # flag -> (ProxySection field, help)
    "--max-body-bytes": ("max_body_bytes", "largest request body in bytes, else 413"),
    "--max-concurrent-per-key": ("max_concurrent_per_key", "in-flight requests per API key, else 429"),
    "--max-queued-prompt-tokens": ("max_queued_prompt_tokens", "prompt tokens of unfinished requests, else 429"),
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see kvfabric.example.yaml)")
    p.add_argument("--model", default=None, help="HF-format model directory, or preset:NAME (random weights of "
                   "that shape with the bundled SmolLM2 tokenizer: llama-3.1-8b, qwen3-0.6b, tiny-llama, ...); "
                   "default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--kv-connector", default=None,
                   help="auto (default: ipc on one host, else nixl, ucx, zmq; logged at start) | zmq | ipc | "
                        "nixl | ucx | lmcache | tiered | multi")
    p.add_argument("--kv-lease-s", type=float, default=None,
                   help="prefill holds a request's KV blocks this long without a renewal from decode, which "
                        "renews every lease/3 while the request waits (default 30)")
    p.add_argument("--kv-load-failure-policy", choices=("recompute", "fail"), default=None,
                   help="a failed KV load: decode recomputes the prompt and the stream goes on (recompute, "
                        "default), or the request fails (fail)")
    p.add_argument("--kv-max-held-fraction", type=float, default=None,
                   help="backpressure: past this share of prefill's KV cache held for decode, prefill admits "
                        "no new prompt until decode reads (default 0.5)")
    p.add_argument("--kv-transfer-config", default=None, help="vLLM-style JSON: {\"kv_connector\": ...}")
    p.add_argument("--dcp-size", type=int, default=None, help="decode context parallel ranks")
    p.add_argument("--api-key", default=None, help="require this bearer token at the proxy")
    for flag, (_, kind) in _ENGINE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None)
    for flag, (_, help_text) in _LIMIT_FLAGS.items():
        p.add_argument(flag, type=int, default=None, help=f"proxy: {help_text} (0: no limit)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--disaggregation", choices=["always", "adaptive", "never"], default=None,
                   help="where prompts are prefilled: always on a prefill instance, adaptive per request, or "
                        "never (on decode); thresholds in proxy.disaggregation of the config")
    p.add_argument("--prefill-gpus", default=None, help="`up`: GPU ids for the prefill engines, e.g. 0")
    p.add_argument("--decode-gpus", default=None, help="`up`: GPU ids for the decode engines, e.g. 1")


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
    if getattr(args, "kv_load_failure_policy", None):
        cfg.kv_transfer_config = {**cfg.kv_transfer_config, "kv_load_failure_policy": args.kv_load_failure_policy}
    for flag, key in (("kv_lease_s", "lease_s"), ("kv_max_held_fraction", "max_held_fraction")):
        if getattr(args, flag, None) is not None:
            extra = {**(cfg.kv_transfer_config.get("kv_connector_extra_config") or {}), key: getattr(args, flag)}
            cfg.kv_transfer_config = {**cfg.kv_transfer_config, "kv_connector_extra_config": extra}
    if getattr(args, "dcp_size", None):
        cfg.decode.dcp_size = args.dcp_size
    if getattr(args, "api_key", None):
        cfg.proxy.api_key = args.api_key
    for flag, (field_name, _) in _ENGINE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            setattr(cfg.engine, field_name, value)
    if getattr(args, "disaggregation", None):
        cfg.proxy.disaggregation.policy = args.disaggregation
    for role in ("prefill", "decode"):
        if getattr(args, f"{role}_gpus", None) is not None:
            getattr(cfg, role).gpus = getattr(args, f"{role}_gpus")
    for flag, (field_name, _) in _LIMIT_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            setattr(cfg.proxy, field_name, value)
    if getattr(args, "no_prefix_caching", False):
        cfg.engine.enable_prefix_caching = False
    return cfg
