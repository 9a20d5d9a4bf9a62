"""The driver of ``kvfabric up --ray ADDRESS``: a ``Controller`` on the cluster places the engines
(kvfabric/ray_cluster.py); this process runs the proxy beside it and keeps the proxy's instance
file equal to the controller's ready set. SIGINT or SIGTERM stops the proxy and every instance."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from kvfabric.config import KVFabricConfig
from kvfabric.up_cmd import Child, shutdown
from proxy.discovery import write_instances

logger = logging.getLogger("kvfabric.ray")


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster (kvfabric up --ray ADDRESS)")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="place prefill and decode instances on this Ray cluster ('auto': RAY_ADDRESS or the "
                        "local one) and run the proxy here; `kvfabric scale` changes the counts")
    g.add_argument("--prefill-instances", type=int, default=None, help="with --ray (default: prefill.instances)")
    g.add_argument("--decode-instances", type=int, default=None, help="with --ray (default: decode.instances)")
    g.add_argument("--cpus-per-instance", type=float, default=1.0, help="with --ray: CPUs each instance reserves")
    g.add_argument("--gpus-per-instance", type=float, default=None,
                   help="with --ray: GPUs each instance reserves (default 1 if the cluster has GPUs, else 0)")


def connect(address: str):
    import ray

    from kvfabric.ray_cluster import NAMESPACE

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
    return ray


def run(cfg: KVFabricConfig, args: argparse.Namespace) -> int:
    ray = connect(args.ray)
    from kvfabric.ray_cluster import CONTROLLER, Controller, pick_connector

    nodes = [n for n in ray.nodes() if n["Alive"]]
    gpus = args.gpus_per_instance
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    if gpus == 0 and cfg.device == "auto":
        cfg.device = "cpu"  # no GPU reserved: an instance must not take a GPU it was not given
    cfg.kv_transfer_config = pick_connector(cfg.kv_transfer_config, len(nodes), gpus > 0)
    desired = {"prefill": cfg.prefill.instances if args.prefill_instances is None else args.prefill_instances,
               "decode": cfg.decode.instances if args.decode_instances is None else args.decode_instances}
    if desired["decode"] < 1:
        raise ValueError("--ray needs at least one decode instance")
    logger.info("Ray cluster %s: %d node(s), %s; placing %s", args.ray, len(nodes),
                ray.cluster_resources(), desired)
    controller = Controller.options(name=CONTROLLER).remote(
        cfg.to_dict(), desired, args.cpus_per_instance, gpus, ready_timeout=args.ready_timeout)

    workdir = Path(tempfile.mkdtemp(prefix="kvfabric-ray-"))
    config_path, instances_path = workdir / "config.yaml", workdir / "instances.json"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    proxy = Child("proxy", [sys.executable, "-m", "kvfabric.cli", "serve", "proxy", "--config", str(config_path),
                            "--port", str(cfg.proxy.port), "--instances-file", str(instances_path)])
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    current: dict | None = None
    deadline = time.monotonic() + args.ready_timeout
    try:
        while not stopping.is_set():
            ready = ray.get(controller.reconcile.remote(), timeout=120)
            if ready != current:
                write_instances(instances_path, ready)
                current = ready
                logger.info("instances: prefill %s, decode %s", ready["prefill"] or "-", ready["decode"] or "-")
            if proxy.proc is None and ready["decode"]:
                proxy.start()  # the proxy needs one decode instance to start; the rest join through the file
                print(f"kvfabric is serving at http://127.0.0.1:{cfg.proxy.port}/v1 — Ctrl-C to stop", flush=True)
            elif proxy.proc is None and time.monotonic() > deadline:
                logger.error("no decode instance became ready within %.0f s", args.ready_timeout)
                return 1
            elif proxy.proc is not None and proxy.proc.poll() is not None:
                logger.warning("the proxy exited with %s; restarting it", proxy.proc.returncode)
                proxy.restarts += 1
                proxy.start()
            time.sleep(1.0)
    finally:
        shutdown([proxy])
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        except Exception as e:
            logger.warning("stopping the instances: %s", e)
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        logger.info("all processes stopped")
    return 0
