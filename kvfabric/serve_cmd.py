"""``kvfabric serve prefill|decode|colocated|proxy``: run one piece of the topology alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import asdict

from kvfabric.config import KVFabricConfig
from kvfabric.overrides import add_config_flags, apply_config_flags

logger = logging.getLogger("kvfabric.serve")

ROLES = ("prefill", "decode", "colocated", "proxy")
_KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run one service: prefill, decode, colocated or proxy")
    p.add_argument("role", choices=ROLES)
    add_config_flags(p)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--prefill", action="append", default=[], help="proxy: a prefill instance host:port")
    p.add_argument("--decode", action="append", default=[], help="proxy: a decode instance host:port")
    p.add_argument("--colocated", action="append", default=[], help="proxy: a colocated instance host:port")
    p.add_argument("--instances-file", default=None,
                   help="proxy: a JSON file {prefill: [...], decode: [...], colocated: [...]} of host:port "
                        "lists, watched and applied when it changes (in place of the three flags above)")


def build_engine(cfg: KVFabricConfig, role: str):
    """An engine for ``role`` with the connector the config names (none when colocated); a decode
    or colocated engine with ``decode.dcp_size`` N > 1 is rank 0 of N context-parallel ranks."""
    from engine import EngineConfig, LLMEngine

    # An unset section value (None) leaves the engine's own default.
    engine_cfg = EngineConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device,
                              **{k: v for k, v in asdict(cfg.engine).items() if v is not None},
                              kv_events_config=cfg.kv_events_config)
    spec = connector_spec(cfg, role)
    connector = None
    if spec is not None:
        from kv_connector import KVTransferConfig, create_connector

        connector = create_connector(KVTransferConfig.from_dict(spec))
    launch = None
    try:
        if role in ("decode", "colocated") and cfg.decode.dcp_size > 1:
            from decode_svc.dcp_ranks import launch_dcp_group

            # Ranks 1..N-1 are this process's children; LLMEngine.shutdown stops them.
            launch = launch_dcp_group(engine_cfg, cfg.decode.dcp_size)
            engine_cfg = launch.engine_config
        return LLMEngine(engine_cfg, kv_connector=connector, dcp_group=launch.group if launch else None)
    except BaseException:
        if connector is not None:
            connector.shutdown()
        if launch is not None:
            launch.group.close()
        raise


def connector_spec(cfg: KVFabricConfig, role: str) -> dict | None:
    """The kv_transfer_config for ``role``. A ``tiers`` section puts the storage tiers in front:
    on prefill a ``multi`` of tiered + the transport (prefixes come from the tiers, the rest is
    computed and handed to decode); colocated, the tiers alone — plus ``lmcache`` when that is the
    connector, since it is a cache as well as the hand-off (a colocated engine then reuses the
    prefixes every instance put on a shared LMCache server)."""
    transport = {**cfg.kv_transfer_config, "kv_role": _KV_ROLES.get(role, "kv_both")}
    if role in _KV_ROLES:
        from kv_connector.auto import resolve_auto

        transport, why = resolve_auto(transport, cfg.prefill.host, cfg.decode.host)
        if why is not None:
            logger.info("%s", why)
    tiered = {"kv_connector": "tiered", "kv_role": "kv_both", "kv_connector_extra_config": cfg.tiers}
    if role == "prefill" and cfg.tiers:
        policy = {k: transport[k] for k in ("kv_load_failure_policy",) if k in transport}
        return {"kv_connector": "multi", "kv_role": "kv_producer", **policy,
                "kv_connector_extra_config": {"connectors": [tiered, transport]}}
    if role == "colocated":
        caches = ([tiered] if cfg.tiers else []) + ([transport] if transport["kv_connector"] == "lmcache" else [])
        if len(caches) > 1:
            return {"kv_connector": "multi", "kv_role": "kv_both", "kv_connector_extra_config": {"connectors": caches}}
        return caches[0] if caches else None
    return transport


def run(args: argparse.Namespace) -> int:
    cfg = apply_config_flags(KVFabricConfig.load(args.config), args)
    if args.role == "proxy":
        from engine.models import resolve_model_path  # the proxy needs the tokenizer directory only
        from proxy.config import ProxyConfig
        from proxy.server import serve

        serve(ProxyConfig.from_kvfabric(cfg, args, model_dir=str(resolve_model_path(cfg.model))))
        return 0
    host = args.host or getattr(cfg, "prefill" if args.role == "prefill" else "decode").host
    server = cfg.lmcache_server
    if server is not None and server.port:  # a fixed server (compose, another host): point at it as `up` does
        from kvfabric.up_cmd import point_lmcache_connectors

        cfg.kv_transfer_config, _ = point_lmcache_connectors(cfg.kv_transfer_config, server.url)
    if args.port is None:
        raise ValueError(f"serve {args.role} needs --port")
    asyncio.run(_serve_engine(cfg, args.role, host, args.port))
    return 0


async def _serve_engine(cfg: KVFabricConfig, role: str, host: str, port: int) -> None:
    import grpc

    from engine.async_engine import AsyncEngine
    from protos import kvfabric_pb2_grpc as pb_grpc

    engine = AsyncEngine(build_engine(cfg, role))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if role == "prefill":
        from prefill_svc.servicer import PrefillServicer

        pb_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(engine, model_name(cfg)), server)
    else:
        from decode_svc.servicer import DecodeServicer

        pb_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(engine, model_name(cfg), role), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logger.info("%s service on %s:%d (pid %d)", role, host, port, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("%s service stopping", role)
    await server.stop(grace=2.0)
    engine.shutdown()


def model_name(cfg: KVFabricConfig) -> str:
    return cfg.proxy.served_model_name or (os.path.basename(cfg.model.rstrip("/")) if cfg.model
                                           else "SmolLM2-135M-Instruct")
