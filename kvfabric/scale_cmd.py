"""``kvfabric scale ROLE N``: change how many prefill or decode instances a ``kvfabric up --ray``
deployment keeps (its controller places or stops them; the proxy follows)."""

from __future__ import annotations

import argparse
import json
import time


def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="set the number of prefill or decode instances of `kvfabric up --ray`")
    p.add_argument("role", choices=["prefill", "decode"])
    p.add_argument("instances", type=int)
    p.add_argument("--ray", metavar="ADDRESS", default="auto",
                   help="the Ray cluster `kvfabric up --ray` runs on (default: RAY_ADDRESS or the local one)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the new count to be ready (0: return at once)")


def run(args: argparse.Namespace) -> int:
    from kvfabric.ray_up import connect

    ray = connect(args.ray)
    from kvfabric.ray_cluster import CONTROLLER, NAMESPACE

    try:
        controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no `kvfabric up --ray` deployment runs on the Ray cluster at {args.ray}") from None
    try:
        ray.get(controller.scale.remote(args.role, args.instances))
    except ray.exceptions.RayTaskError as e:
        raise ValueError(str(e.cause)) from None
    deadline = time.monotonic() + args.wait
    while True:
        status = ray.get(controller.status.remote())
        if len(status["ready"][args.role]) == args.instances or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    print(json.dumps({"desired": status["desired"], "ready": status["ready"]}))
    ready = len(status["ready"][args.role]) == args.instances
    ray.shutdown()
    return 0 if ready or not args.wait else 1
