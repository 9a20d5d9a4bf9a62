"""``kvfabric up``: proxy + prefill + decode on this machine, supervised, from one config.

Each piece is the same ``kvfabric serve ROLE`` command docker-compose runs. Internal ports are
picked free at start-up so two ``up``s can run side by side. A piece that dies is restarted
(with backoff); SIGINT or SIGTERM stops every child, and children are tied to this process's
life (PR_SET_PDEATHSIG) so even a hard kill of ``up`` leaves no orphan.

With an ``lmcache_server`` section, LMCache's standalone server is one more child
(``python -m storage_tiers.lmcache_server``, as docker-compose's ``lmcache-server`` service runs
it): started first and waited for, since an ``lmcache`` connector that requires its server fails
at start without it; restarted like the rest when it dies (the engines serve misses meanwhile and
reconnect), and stopped last. Every ``lmcache`` connector without a ``remote_url`` is pointed at it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from decode_svc.dcp_ranks import die_with_parent
from kvfabric.config import KVFabricConfig
from kvfabric.overrides import add_config_flags, apply_config_flags
from kvfabric.placement import parse_gpus, place, visible_gpus
from storage_tiers.lmcache_server import port_open, server_argv, wait_for_port

logger = logging.getLogger("kvfabric.up")


def add_parser(sub) -> None:
    p = sub.add_parser("up", help="start proxy + prefill + decode on this machine", description=UP_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    p.add_argument("--port", type=int, default=None, help="the proxy's port (default 8000)")
    p.add_argument("--colocated", action="store_true", help="one engine does both phases (no prefill instance)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    from kvfabric import ray_up  # here: ray_up imports this module

    ray_up.add_flags(p)


UP_HELP = """Start proxy + prefill + decode on this machine, supervised, from one config plus flags.

GPU placement: engines are laid onto the visible GPUs in turn, prefill first, so with two GPUs
prefill runs on GPU 0 and decode on GPU 1 (each child's CUDA_VISIBLE_DEVICES lists its own GPU
first); --prefill-gpus / --decode-gpus (or prefill.gpus / decode.gpus) pick them ("0", "1,2").
On one GPU both share it. --gpu-memory-utilization is each engine's fraction of the GPU's TOTAL
memory (weights + activations + KV cache); unset, 0.9 is split evenly among the engines sharing a
GPU. The engines' fractions on one GPU may not add up to more than 1.

Where the prompt is prefilled (--disaggregation, proxy.disaggregation in the config):
  always    every prompt on a prefill instance, its KV shipped to decode (the default)
  adaptive  per request: on the decode instance itself when the prompt is short
            (short_prompt_tokens), mostly cached on decode (cached_fraction), or when the prefill
            queue would take longer than prefilling it on decode (up to max_local_prefill_tokens);
            otherwise on a prefill instance. Counted in kvfabric_prefill_decisions_total{where,reason}.
  never     every prompt on the decode instance (the prefill instances stay idle)
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # beyond this process's own (CUDA_VISIBLE_DEVICES)
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KVFABRIC_PROCESS": self.name, **self.env}
        self.proc = subprocess.Popen(self.argv, env=env, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()


def _instance_config(cfg: KVFabricConfig, config_path: Path, serve_role: str, name: str, instances: int) -> Path:
    """The config one instance serves from. A disk tier is one process's directory (it flocks it),
    so with several instances of a role that keeps tiers each gets ``<path>/<name>`` of its own."""
    disk = (cfg.tiers or {}).get("disk")
    if not disk or instances < 2 or serve_role not in ("prefill", "colocated"):
        return config_path
    data = cfg.to_dict()
    data["tiers"] = {**data["tiers"], "disk": {**disk, "path": str(Path(disk["path"]) / name)}}
    own = config_path.with_name(f"config.{name}.yaml")
    own.write_text(yaml.safe_dump(data))
    return own


def build_children(cfg: KVFabricConfig, config_path: Path, colocated: bool) -> tuple[list[Child], dict]:
    exe = [sys.executable, "-m", "kvfabric.cli"]
    children, addrs = [], {"prefill": [], "decode": []}
    roles = ["decode"] if colocated else ["prefill", "decode"]
    all_gpus = visible_gpus(cfg.device)
    placements = place(all_gpus, [(role, getattr(cfg, role).instances, cfg.decode.dcp_size if role == "decode" else 1,
                                   parse_gpus(getattr(cfg, role).gpus, f"{role}.gpus"),
                                   getattr(cfg, role).gpu_memory_utilization) for role in roles],
                       cfg.engine.gpu_memory_utilization)
    for role in roles:
        section = getattr(cfg, role)
        for i in range(section.instances):
            port = section.ports[i] if i < len(section.ports) else free_port(section.host)
            addrs[role].append(f"{section.host}:{port}")
            serve_role = "colocated" if colocated else role
            where = placements[role][i]
            own = _instance_config(cfg, config_path, serve_role, f"{role}{i}", section.instances)
            argv = exe + ["serve", serve_role, "--config", str(own), "--host", section.host, "--port", str(port)]
            env = {}
            if where.gpus:
                env["CUDA_VISIBLE_DEVICES"] = where.cuda_visible_devices(all_gpus)
                argv += ["--gpu-memory-utilization", f"{where.gpu_memory_utilization:g}"]
                logger.info("%s%d on GPU %s, %.0f%% of its memory", role, i, ",".join(where.gpus),
                            100 * where.gpu_memory_utilization)
            children.append(Child(f"{role}{i}", argv, env=env))
    proxy_argv = exe + ["serve", "proxy", "--config", str(config_path), "--port", str(cfg.proxy.port)]
    for a in addrs["prefill"]:
        proxy_argv += ["--prefill", a]
    for a in addrs["decode"]:
        proxy_argv += ["--colocated" if colocated else "--decode", a]
    children.append(Child("proxy", proxy_argv))
    return children, addrs


def lmcache_server_child(cfg: KVFabricConfig) -> Child | None:
    """Resolve the ``lmcache_server`` section: pick its port if 0, point the ``lmcache`` connectors
    at it, and return the child that runs it (None without the section, or with ``start: false``)."""
    server = cfg.lmcache_server
    if server is None:
        return None
    if server.start and not server.port:
        server.port = free_port(server.host)
    cfg.kv_transfer_config, pointed = point_lmcache_connectors(cfg.kv_transfer_config, server.url)
    if not pointed:
        logger.warning("lmcache_server %s is configured but no lmcache connector uses it (kv_connector: %s)",
                       server.url, cfg.kv_transfer_config.get("kv_connector"))
    if not server.start:
        return None
    if port_open(server.reach_host, server.port):
        raise ValueError(f"lmcache_server: {server.reach_host}:{server.port} is already in use (an LMCache server "
                         f"running there already? `start: false` uses it instead of starting one)")
    return Child("lmcache-server", server_argv(server.host, server.port))


def point_lmcache_connectors(spec: dict, url: str) -> tuple[dict, int]:
    """``spec`` with ``remote_url: url`` on every ``lmcache`` connector (a ``multi``'s too) that names
    no server, and how many connectors now use ``url``."""
    extra = spec.get("kv_connector_extra_config") or {}
    if spec.get("kv_connector") == "multi":
        pointed = [point_lmcache_connectors(child, url) for child in extra.get("connectors", [])]
        return ({**spec, "kv_connector_extra_config": {**extra, "connectors": [c for c, _ in pointed]}},
                sum(n for _, n in pointed))
    if spec.get("kv_connector") != "lmcache":
        return spec, 0
    given = extra.get("remote_url")
    if given is None and extra.get("lmcache_config_file"):
        # LMCache's own config file may name the server; an inline key would override it.
        given = (yaml.safe_load(Path(extra["lmcache_config_file"]).read_text()) or {}).get("remote_url")
    if given is None:
        return {**spec, "kv_connector_extra_config": {**extra, "remote_url": url}}, 1
    if given != url:
        logger.warning("an lmcache connector keeps its own remote_url %s, not the lmcache_server at %s", given, url)
    return spec, int(given == url)


def _wait_ready(url: str, children: list[Child], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.proc.poll() is not None for c in children):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                # Ready means every instance is in rotation: the proxy alone answers 200 as soon
                # as one path can serve, and requests would then skip a prefill still loading.
                body = json.loads(r.read() or b"{}")
                if r.status == 200 and all(i.get("healthy") for i in body.get("instances", [])):
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return False


def run(args: argparse.Namespace) -> int:
    cfg = apply_config_flags(KVFabricConfig.load(args.config), args)
    if args.port is not None:
        cfg.proxy.port = args.port
    if getattr(args, "ray", None):
        from kvfabric import ray_up

        return ray_up.run(cfg, args)
    if not args.colocated:  # decided once here: every engine reads the concrete name
        from kv_connector.auto import resolve_auto

        cfg.kv_transfer_config, why = resolve_auto(cfg.kv_transfer_config, cfg.prefill.host, cfg.decode.host)
        if why is not None:
            logger.info("%s", why)
    server = lmcache_server_child(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="kvfabric-up-"))
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    children, addrs = build_children(cfg, config_path, args.colocated)

    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        if server is not None:
            server.start()
            try:
                wait_for_port(cfg.lmcache_server.reach_host, cfg.lmcache_server.port, args.ready_timeout, server.proc)
            except (RuntimeError, TimeoutError) as e:
                logger.error("the LMCache server did not start: %s", e)
                return 1
            logger.info("LMCache server listening at %s", cfg.lmcache_server.url)
            children.insert(0, server)
            if stopping:
                return 0
        for c in children:
            if c.proc is None:
                c.start()
        url = f"http://127.0.0.1:{cfg.proxy.port}"
        if _wait_ready(url + "/health", children, args.ready_timeout):
            logger.info("kvfabric up: %s/v1  (prefill %s, decode %s%s)", url, addrs["prefill"] or "-", addrs["decode"],
                        f", LMCache server {cfg.lmcache_server.url}" if cfg.lmcache_server else "")
            print(f"kvfabric is serving at {url}/v1 — Ctrl-C to stop", flush=True)
        elif not stopping:
            dead = [f"{c.name} (exit status {c.proc.returncode})" for c in children if c.proc.poll() is not None]
            if dead:
                logger.error("%s exited during start-up; its log above says why", ", ".join(dead))
            else:
                logger.error("the topology did not become ready within %.0f s", args.ready_timeout)
            stopping, code = True, 1
        while not stopping:
            time.sleep(0.2)
            for c in children:
                status = c.proc.poll()
                if status is None or stopping:
                    continue
                if c.next_start == 0.0:
                    backoff = min(30.0, 2.0 ** min(c.restarts, 5)) if time.monotonic() - c.started_at < 60 else 1.0
                    logger.warning("%s exited with %s; restarting in %.0f s", c.name, status, backoff)
                    c.next_start = time.monotonic() + backoff
                elif time.monotonic() >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    c.start()
    finally:
        # The LMCache server goes last: engines that are still finishing keep their remote tier.
        shutdown([c for c in children if c is not server])
        shutdown([server] if server is not None else [])
        logger.info("all processes stopped")
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def shutdown(children: list[Child], grace: float = 10.0) -> None:
    for c in children:
        if c.proc and c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", c.name, grace)
            c.proc.kill()
            c.proc.wait()
