"""``kvfabric health HOST:PORT``: exit 0 when an engine service answers Health with ok (for
container health checks)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("health", help="check an engine service's Health RPC")
    p.add_argument("address", help="host:port of a prefill, decode or colocated service")
    p.add_argument("--service", choices=["prefill", "decode"], default="decode")
    p.add_argument("--timeout", type=float, default=5.0)


def run(args: argparse.Namespace) -> int:
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
