"""What one proxy process serves and where its engines are."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from proxy.limits import Limits


DISAGGREGATION_POLICIES = ("always", "adaptive", "never")


@dataclass
class DisaggregationConfig:
    """Where each prompt is prefilled (proxy/adaptive.py): on a prefill instance, or on decode itself."""

    policy: str = "always"  # always | adaptive | never
    short_prompt_tokens: int = 256  # adaptive: prompts of at most this many uncached tokens prefill on decode
    cached_fraction: float = 0.75  # adaptive: ... and so do those decode already caches this fraction of
    # adaptive: a prompt prefills on decode when the prefill queue would take longer than that,
    # up to this many uncached tokens (a longer local prefill stalls decode's batch: DistServe).
    max_local_prefill_tokens: int = 2048
    prefill_tokens_per_s: float | None = None  # the throughput assumed until one is measured

    def __post_init__(self) -> None:
        if self.policy not in DISAGGREGATION_POLICIES:
            raise ValueError(f"proxy.disaggregation.policy {self.policy!r}: expected one of {', '.join(DISAGGREGATION_POLICIES)}")
        if self.short_prompt_tokens < 0 or self.max_local_prefill_tokens < 0:
            raise ValueError("proxy.disaggregation: token thresholds must be >= 0")
        if not 0.0 < self.cached_fraction <= 1.0:
            raise ValueError("proxy.disaggregation.cached_fraction must be in (0, 1]")


@dataclass
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=lambda: ["SmolLM2-135M-Instruct"])
    tokenizer_dir: str | None = None  # an HF-format directory with the tokenizer (and chat template)
    max_model_len: int | None = None  # None: the smallest the engines report, else the model's config
    prefill_addrs: list[str] = field(default_factory=list)  # host:port of PrefillService instances
    decode_addrs: list[str] = field(default_factory=list)  # DecodeService instances in consumer role
    colocated_addrs: list[str] = field(default_factory=list)  # DecodeService instances doing both phases
    api_key: str | None = None  # None: taken from KVFABRIC_API_KEY when set
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    prefill_timeout_s: float = 600.0  # a deadline for one Prefill RPC (long prompts queue)
    generate_timeout_s: float = 3600.0  # a deadline for one whole Generate stream
    abort_timeout_s: float = 2.0
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    routing_policy: str = "least_load"  # round_robin | least_load | prefix (proxy/router.py)
    prefix_weight: float = 2.0  # prefix policy: weight of the cached fraction of the prompt
    load_weight: float = 1.0  # prefix policy: weight of the instance's spare capacity
    session_header: str = "x-session-id"  # a request's session for affinity (else the `user` field)
    max_body_bytes: int = 8 << 20  # a larger request body gets a 413 (0: no limit)
    max_concurrent_per_key: int = 0  # in-flight requests per API key before a 429 (0: no limit)
    max_queued_prompt_tokens: int = 0  # prompt tokens of unfinished requests before a 429 (0: no limit)
    instances_file: str | None = None  # a JSON instance set the proxy watches (proxy/discovery.py)

    def __post_init__(self) -> None:
        if self.instances_file:  # the file's set replaces the address lists, now and when it changes
            from proxy.discovery import read_instances

            sets = read_instances(self.instances_file)
            self.prefill_addrs, self.decode_addrs, self.colocated_addrs = (
                sets["prefill"], sets["decode"], sets["colocated"])
        if self.api_key is None:
            self.api_key = os.environ.get("KVFABRIC_API_KEY") or None
        if not self.served_model_names:
            raise ValueError("the proxy needs at least one served model name")
        if not (self.decode_addrs or self.colocated_addrs):
            raise ValueError("the proxy needs at least one decode or colocated instance")
        from proxy.router import POLICIES

        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy must be one of {', '.join(POLICIES)}, got {self.routing_policy!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} leaves no room to generate")
        self.limits = Limits(self.max_body_bytes, self.max_concurrent_per_key, self.max_queued_prompt_tokens)

    @property
    def default_model(self) -> str:
        return self.served_model_names[0]

    @classmethod
    def from_kvfabric(cls, cfg: Any, args: Any, model_dir: str | None = None) -> "ProxyConfig":
        """From the topology config and ``kvfabric serve proxy`` flags.

        ``model_dir`` is the resolved model directory; the caller resolves the bundled default
        model (that takes engine code, which the proxy must not import).
        """
        tokenizer_dir = model_dir or cfg.model
        if tokenizer_dir is None:
            raise ValueError("the proxy needs the model directory for its tokenizer: pass model_dir "
                             "(e.g. engine.models.resolve_model_path(None)) or set `model`")
        name = cfg.proxy.served_model_name or os.path.basename(str(cfg.model or tokenizer_dir).rstrip("/"))
        if cfg.model is None and not cfg.proxy.served_model_name:
            name = "SmolLM2-135M-Instruct"
        return cls(
            host=getattr(args, "host", None) or cfg.proxy.host,
            port=getattr(args, "port", None) or cfg.proxy.port,
            served_model_names=[name],
            tokenizer_dir=str(tokenizer_dir),
            max_model_len=cfg.engine.max_model_len,
            prefill_addrs=list(getattr(args, "prefill", []) or []),
            decode_addrs=list(getattr(args, "decode", []) or []),
            colocated_addrs=list(getattr(args, "colocated", []) or []),
            api_key=getattr(args, "api_key", None) or cfg.proxy.api_key,
            health_interval_s=cfg.proxy.health_interval_s,
            disaggregation=cfg.proxy.disaggregation,
            routing_policy=cfg.proxy.routing_policy, prefix_weight=cfg.proxy.prefix_weight,
            load_weight=cfg.proxy.load_weight, session_header=cfg.proxy.session_header,
            max_body_bytes=cfg.proxy.max_body_bytes,
            max_concurrent_per_key=cfg.proxy.max_concurrent_per_key,
            max_queued_prompt_tokens=cfg.proxy.max_queued_prompt_tokens,
            instances_file=getattr(args, "instances_file", None),
        )
