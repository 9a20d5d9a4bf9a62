"""``kvfabric up --ray ADDRESS``: prefill and decode instances placed on a Ray cluster's nodes.

Each instance is a Ray actor (``EngineProcess``) in its own placement group of one bundle
(CPUs, and GPUs where the cluster has them), so Ray picks the node and reserves the resources.
The actor starts the same ``kvfabric serve ROLE`` process that ``up`` and compose run, bound to
its node's address; that process dies with the actor (PR_SET_PDEATHSIG), so a lost node or a
killed actor leaves nothing running.

A named ``Controller`` actor owns the instances: it keeps as many of each role as asked
(``kvfabric scale prefill 3`` changes the number), replaces one whose process or node dies, and
lists the ready ones. The driver (this command, on the machine the proxy runs on) runs the proxy
with ``--instances-file`` and rewrites that file each time the list changes (proxy/discovery.py).

Connectors: each instance binds its KV port on its own node's address (``kv_ip``,
``advertise_host``). A same-host connector (``ipc``) cannot reach across nodes, so on a cluster
of more than one node it becomes a cross-host one: ``nixl`` (else ``ucx``) where the instances
have GPUs and the wheel imports, else ``zmq``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvfabric.config import KVFabricConfig

logger = logging.getLogger("kvfabric.ray")

NAMESPACE = "kvfabric"
CONTROLLER = "kvfabric-controller"
ROLES = ("prefill", "decode")
SAME_HOST_CONNECTORS = {"ipc", "auto"}  # auto resolves per host: across nodes it must not pick ipc


def pick_connector(kv: dict, nodes: int, gpus: bool) -> dict:
    """``kv`` with a connector that reaches across ``nodes`` nodes (see the module docstring)."""
    if nodes <= 1 or kv.get("kv_connector") not in SAME_HOST_CONNECTORS:
        return kv
    choice = "zmq"
    if gpus:
        wheels = {"nixl": ("nixl", "nixl_cu13", "nixl_cu12"), "ucx": ("ucxx",)}
        choice = next((c for c, mods in wheels.items() if any(importlib.util.find_spec(m) for m in mods)), "zmq")
    logger.info("kv_connector %s is same-host only and the cluster has %d nodes: using %s",
                kv["kv_connector"], nodes, choice)
    return {**kv, "kv_connector": choice}


def instance_config(cfg: dict, host: str) -> dict:
    """One instance's config: its KV endpoint on its own node, on a port of its own."""
    cfg = copy.deepcopy(cfg)
    kv = cfg["kv_transfer_config"]
    kv["kv_ip"], kv["kv_port"] = host, 0  # 0: ephemeral, named in each request's kv_transfer_params
    kv.setdefault("kv_connector_extra_config", {})["advertise_host"] = host
    return cfg


@ray.remote(max_restarts=0)
class EngineProcess:
    """One ``kvfabric serve ROLE`` process on the node Ray placed this actor on."""

    def __init__(self, role: str, cfg: dict) -> None:
        from decode_svc.dcp_ranks import die_with_parent
        from kvfabric.up_cmd import free_port

        self.role = role
        self.host = ray.util.get_node_ip_address()
        self.port = free_port(self.host)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kvfabric-{role}-"))
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(instance_config(cfg, self.host)))
        argv = [sys.executable, "-m", "kvfabric.cli", "serve", role, "--config", str(config),
                "--host", self.host, "--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KVFABRIC_PROCESS": f"{role}@{self.host}:{self.port}"}
        self.proc = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent)

    def wait_ready(self, timeout: float) -> str:
        """The instance's address once its Health RPC answers ok; raises if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode} during start-up")
            if _healthy(self.address(), self.role):
                return self.address()
            time.sleep(0.5)
        raise TimeoutError(f"{self.role} at {self.address()} not ready within {timeout:.0f} s")

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def info(self) -> dict:
        return {"role": self.role, "address": self.address(), "pid": self.proc.pid, "exit": self.proc.poll(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _healthy(address: str, role: str) -> bool:
    import grpc

    from protos import kvfabric_pb2 as pb
    from protos import kvfabric_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = (pb_grpc.PrefillServiceStub if role == "prefill" else pb_grpc.DecodeServiceStub)(channel)
        try:
            return stub.Health(pb.HealthRequest(), timeout=2.0).ok
        except grpc.RpcError:
            return False


@dataclass
class Member:
    role: str
    actor: "ray.actor.ActorHandle"
    pg: "ray.util.placement_group.PlacementGroup"
    ready: "ray.ObjectRef"
    address: str | None = None
    retire_at: float | None = None  # scaled away: out of the proxy's set, stopped after the drain


@ray.remote(num_cpus=0, max_restarts=0)
class Controller:
    """Keeps ``desired[role]`` instances of each role running and ready (module docstring)."""

    def __init__(self, cfg: dict, desired: dict[str, int], cpus: float, gpus: float,
                 ready_timeout: float = 600.0, drain_s: float = 30.0) -> None:
        self.cfg, self.desired = cfg, dict(desired)
        self.cpus, self.gpus, self.ready_timeout, self.drain_s = cpus, gpus, ready_timeout, drain_s
        self.members: list[Member] = []
        self.replaced = 0

    def scale(self, role: str, n: int) -> dict[str, int]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if n < (1 if role == "decode" else 0):
            raise ValueError(f"{role} needs at least {1 if role == 'decode' else 0} instance(s), not {n}")
        logger.info("scaling %s to %d", role, n)
        self.desired[role] = n
        return dict(self.desired)

    def _start(self, role: str) -> Member:
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK")
        actor = EngineProcess.options(
            num_cpus=self.cpus, num_gpus=self.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg)).remote(role, self.cfg)
        return Member(role, actor, pg, actor.wait_ready.remote(self.ready_timeout))

    def _drop(self, m: Member, why: str) -> None:
        logger.warning("%s instance %s %s", m.role, m.address or "(starting)", why)
        try:
            ray.get(m.actor.stop.remote(), timeout=15)
        except Exception:  # already dead: the process died with it
            pass
        ray.kill(m.actor)
        remove_placement_group(m.pg)
        self.members.remove(m)

    def reconcile(self) -> dict[str, list[str]]:
        """One round: collect ready instances, replace dead ones, scale to ``desired``; the ready set."""
        now = time.monotonic()
        for m in [m for m in self.members if m.address is None]:
            done, _ = ray.wait([m.ready], timeout=0)
            if done:
                try:
                    m.address = ray.get(m.ready)
                    logger.info("%s instance ready at %s", m.role, m.address)
                except Exception as e:  # exited or timed out during start-up, or its node died
                    self._drop(m, f"failed to start: {e}")
                    self.replaced += 1
        live = [m for m in self.members if m.address is not None]
        infos = [m.actor.info.remote() for m in live]
        for m, ref in zip(live, infos):
            try:
                exited = ray.get(ref, timeout=10)["exit"]
            except Exception as e:  # the actor or its node is gone
                exited = repr(e)
            if exited is not None:
                self._drop(m, f"died ({exited}); replacing it")
                self.replaced += 1
        for role in ROLES:
            mine = [m for m in self.members if m.role == role and m.retire_at is None]
            for _ in range(self.desired[role] - len(mine)):
                self.members.append(self._start(role))
            for m in sorted(mine, key=lambda m: m.address is not None)[:max(0, len(mine) - self.desired[role])]:
                m.retire_at = now + self.drain_s  # leaves the proxy's set now, stops after the drain
        for m in [m for m in self.members if m.retire_at is not None and m.retire_at <= now]:
            self._drop(m, "scaled away")
        return self.instances()

    def instances(self) -> dict[str, list[str]]:
        return {role: [m.address for m in self.members if m.role == role and m.address and m.retire_at is None]
                for role in ROLES}

    def status(self) -> dict:
        return {"desired": dict(self.desired), "ready": self.instances(), "replaced": self.replaced}

    def members(self) -> list[dict]:
        """What each ready instance runs (its process id and node), for operators and tests."""
        out = []
        for m in self.members:
            if m.address:
                try:
                    out.append(ray.get(m.actor.info.remote(), timeout=10))
                except Exception as e:
                    out.append({"role": m.role, "address": m.address, "error": repr(e)})
        return out

    def shutdown(self) -> None:
        for m in list(self.members):
            self._drop(m, "stopping")
