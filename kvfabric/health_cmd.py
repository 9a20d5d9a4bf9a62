"""``kvfabric health HOST:PORT``: exit 0 when an engine service answers Health with ok, or (``--service
lmcache``) when an LMCache server answers LMCache's HEALTH command (for container health checks)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("health", help="check an engine service's Health RPC, or an LMCache server")
    p.add_argument("address", help="host:port of a prefill, decode or colocated service, or of an LMCache server")
    p.add_argument("--service", choices=["prefill", "decode", "lmcache"], default="decode")
    p.add_argument("--timeout", type=float, default=5.0)


def run(args: argparse.Namespace) -> int:
    if args.service == "lmcache":
        return _lmcache_health(args)
    import grpc

    from protos import kvfabric_pb2 as pb
    from protos import kvfabric_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.address) as channel:
        stub = (pb_grpc.PrefillServiceStub if args.service == "prefill" else pb_grpc.DecodeServiceStub)(channel)
        try:
            reply = stub.Health(pb.HealthRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}")
            return 1
    print(json.dumps({"ok": reply.ok, "role": reply.role, "model": reply.model,
                      "running": reply.num_running, "waiting": reply.num_waiting}))
    return 0 if reply.ok else 1


def _lmcache_health(args: argparse.Namespace) -> int:
    """A HEALTH round trip rather than a connect: it shows an LMCache server answering there, not just
    some process listening."""
    from storage_tiers.base import StorageTierError
    from storage_tiers.remote_tier import RemoteTier

    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {args.address!r}")
    try:
        tier = RemoteTier(host, int(port), block_bytes=1, connect_timeout_s=args.timeout, io_timeout_s=args.timeout)
    except StorageTierError:
        print(f"unhealthy: no LMCache server answers at {host}:{port}")
        return 1
    try:
        ok = tier.health()
    finally:
        tier.close()
    print(json.dumps({"ok": ok, "service": "lmcache", "address": f"{host}:{port}"}))
    return 0 if ok else 1
