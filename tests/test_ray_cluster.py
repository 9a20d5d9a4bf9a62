"""``kvfabric up --ray`` on a local Ray cluster of three nodes (``ray.cluster_utils.Cluster``, one CPU
each, so every instance lands on a node of its own): it serves the bundled model's greedy text
through the proxy, replaces an instance whose process is killed, and ``kvfabric scale prefill 2``
adds an instance under load with no request lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from tests.topology import REPO, free_port

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from kvfabric.ray_cluster import CONTROLLER, NAMESPACE, instance_config, pick_connector  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "Once upon a time"]
MAX_TOKENS = 12


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def cluster():
    node = dict(num_cpus=1, object_store_memory=80 << 20)
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(**node)
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def reference(default_model_dir):
    from engine import LLM, SamplingParams

    llm = LLM(model=str(default_model_dir), dtype="float32", device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    text = {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}
    del llm
    return text


class RayUp:
    def __init__(self, cluster, workdir) -> None:
        self.address, self.port = cluster.address, free_port()
        cfg = {"dtype": "float32", "device": "cpu",
               "engine": {"max_model_len": 1024, "kv_cache_bytes": 64 << 20, "max_num_batched_tokens": 256},
               "proxy": {"port": self.port, "health_interval_s": 0.5},
               "kv_transfer_config": {"kv_connector": "ipc",  # same-host only: --ray must pick zmq here
                                      "kv_connector_extra_config": {"expiry_s": 10, "recv_timeout_s": 10}}}
        self.config = workdir / "ray.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "ray-up.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvfabric.cli", "up", "--ray", self.address, "--config",
                                      str(self.config), "--ready-timeout", "600"], cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> dict[str, list[str]]:
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        try:
            r = httpx.get(f"{self.url}/health", timeout=5)
        except httpx.HTTPError:
            return {}
        out: dict[str, list[str]] = {}
        for i in r.json()["instances"]:
            if i["healthy"]:
                out.setdefault(i["role"], []).append(i["address"])
        return out

    def controller(self):
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory, default_model_dir):
    up = RayUp(cluster, tmp_path_factory.mktemp("ray"))
    try:
        _wait(lambda: len(up.healthy().get("decode", [])) == 1 and len(up.healthy().get("prefill", [])) == 1,
              900, "kvfabric up --ray: one prefill and one decode in rotation")
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING")
        yield up
    except Exception:
        print(up.log.read_text()[-6000:])
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
        up.stop()
        log = up.log.read_text()
        assert "all processes stopped" in log, log[-4000:]


def _complete(url: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=300,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_same_host_connector_becomes_a_cross_host_one_past_one_node():
    assert pick_connector({"kv_connector": "ipc"}, nodes=1, gpus=False) == {"kv_connector": "ipc"}
    assert pick_connector({"kv_connector": "ipc"}, nodes=3, gpus=False) == {"kv_connector": "zmq"}
    assert pick_connector({"kv_connector": "ipc"}, nodes=3, gpus=True) == {"kv_connector": "nixl"}  # setup installs it
    assert pick_connector({"kv_connector": "nixl"}, nodes=3, gpus=True) == {"kv_connector": "nixl"}
    one = instance_config({"kv_transfer_config": {"kv_connector": "zmq", "kv_port": 55001}}, "10.0.0.7")
    assert one["kv_transfer_config"] == {"kv_connector": "zmq", "kv_ip": "10.0.0.7", "kv_port": 0,
                                         "kv_connector_extra_config": {"advertise_host": "10.0.0.7"}}


def test_instances_land_on_separate_nodes_and_serve_the_greedy_text(served, reference):
    members = ray.get(served.controller().members.remote())
    assert sorted(m["role"] for m in members) == ["decode", "prefill"]
    assert len({m["node_id"] for m in members}) == 2  # one CPU per node: one instance per node
    for prompt in PROMPTS:
        assert _complete(served.url, prompt) == reference[prompt]
    assert "same-host only and the cluster has 3 nodes: using zmq" in served.log.read_text()


def test_a_killed_instance_is_replaced_and_the_proxy_recovers(served, reference):
    controller = served.controller()
    [decode] = [m for m in ray.get(controller.members.remote()) if m["role"] == "decode"]
    os.kill(decode["pid"], signal.SIGKILL)
    _wait(lambda: decode["address"] not in served.healthy().get("decode", []), 60, "the dead decode leaves rotation")
    new = _wait(lambda: [a for a in served.healthy().get("decode", []) if a != decode["address"]], 600,
                "a replacement decode in rotation")
    assert len(new) == 1 and ray.get(controller.status.remote())["replaced"] >= 1
    for prompt in PROMPTS:
        assert _complete(served.url, prompt) == reference[prompt]


def test_scale_prefill_to_two_under_load_loses_nothing(served, reference):
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            try:
                results.append((prompt, _complete(served.url, prompt)))
            except BaseException as e:  # every failure counts: nothing may be lost
                errors.append(e)
            i += 1

    with ThreadPoolExecutor(2) as pool:
        for i in range(2):
            pool.submit(load, i)
        scale = subprocess.run([sys.executable, "-m", "kvfabric.cli", "scale", "prefill", "2", "--ray", served.address,
                                "--wait", "600"], cwd=REPO, capture_output=True, text=True, timeout=700)
        assert scale.returncode == 0, scale.stdout + scale.stderr
        assert len(json.loads(scale.stdout.splitlines()[-1])["ready"]["prefill"]) == 2
        _wait(lambda: len(served.healthy().get("prefill", [])) == 2, 60, "two prefill instances in rotation")
        served_before = len(results)
        _wait(lambda: len(results) >= served_before + 6, 300, "requests after the scale-up")
        stop.set()
    assert not errors, errors[:3]
    assert results and all(text == reference[prompt] for prompt, text in results)
    members = ray.get(served.controller().members.remote())
    assert len({m["node_id"] for m in members}) == 3  # the new prefill went to the free node
