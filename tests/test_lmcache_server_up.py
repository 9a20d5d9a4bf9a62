"""``kvfabric up`` runs LMCache's server itself when the config has an ``lmcache_server`` section:
it points every ``lmcache`` connector at it, starts it before the engines, and restarts it when it
dies while requests keep their colocated output. Without the section nothing changes. The last
tests run the real topology; skipped where lmcache is not installed."""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lmcache.v1.cache_engine")

from kvfabric import health_cmd  # noqa: E402
from kvfabric.cli import main as kvfabric_main  # noqa: E402
from kvfabric.config import KVFabricConfig  # noqa: E402
from kvfabric.up_cmd import lmcache_server_child  # noqa: E402
from storage_tiers.lmcache_server import free_port, port_open, server_argv  # noqa: E402

LMCACHE = {"kv_connector": "lmcache", "kv_connector_extra_config": {"max_local_cpu_size": 0.1}}


def config(**sections) -> KVFabricConfig:
    return KVFabricConfig.from_dict({"kv_transfer_config": LMCACHE, **sections})


def remote_url(spec: dict) -> str | None:
    return spec["kv_connector_extra_config"].get("remote_url")


# ---- planning: what `up` starts and where the connectors point --------------------------------------------


def test_without_the_section_nothing_starts_and_no_connector_changes():
    cfg = config()
    assert cfg.lmcache_server is None
    assert lmcache_server_child(cfg) is None
    assert cfg.kv_transfer_config == LMCACHE


def test_the_section_starts_a_server_on_a_free_port_and_points_the_connector_at_it():
    cfg = config(lmcache_server={})
    child = lmcache_server_child(cfg)
    port = cfg.lmcache_server.port
    assert port and not port_open("127.0.0.1", port)
    assert child.name == "lmcache-server" and child.argv == server_argv("127.0.0.1", port)
    assert remote_url(cfg.kv_transfer_config) == f"lm://127.0.0.1:{port}"
    assert cfg.kv_transfer_config["kv_connector_extra_config"]["max_local_cpu_size"] == 0.1


def test_a_server_on_every_interface_is_reached_on_loopback():
    port = free_port()
    cfg = config(lmcache_server={"host": "0.0.0.0", "port": port})
    assert lmcache_server_child(cfg).argv == server_argv("0.0.0.0", port)
    assert remote_url(cfg.kv_transfer_config) == f"lm://127.0.0.1:{port}"


def test_start_false_points_the_connectors_at_a_server_that_runs_elsewhere():
    cfg = config(lmcache_server={"host": "10.0.0.7", "port": 65432, "start": False})
    assert lmcache_server_child(cfg) is None
    assert remote_url(cfg.kv_transfer_config) == "lm://10.0.0.7:65432"
    with pytest.raises(ValueError, match="needs its port"):
        config(lmcache_server={"start": False})


def test_every_lmcache_connector_of_a_multi_is_pointed_and_a_given_remote_url_is_kept(tmp_path):
    lmcache_yaml = tmp_path / "lmcache.yaml"
    lmcache_yaml.write_text(yaml.safe_dump({"remote_url": "lm://10.0.0.9:1234", "chunk_size": 16}))
    chain = [{"kv_connector": "tiered", "kv_connector_extra_config": {}},
             {"kv_connector": "lmcache", "kv_connector_extra_config": {}},
             {"kv_connector": "lmcache", "kv_connector_extra_config": {"remote_url": "lm://10.0.0.8:1234"}},
             {"kv_connector": "lmcache", "kv_connector_extra_config": {"lmcache_config_file": str(lmcache_yaml)}}]
    cfg = KVFabricConfig.from_dict({"kv_transfer_config": {"kv_connector": "multi",
                                                           "kv_connector_extra_config": {"connectors": chain}},
                                    "lmcache_server": {"port": 65431, "start": False}})
    lmcache_server_child(cfg)
    got = [c["kv_connector_extra_config"].get("remote_url")
           for c in cfg.kv_transfer_config["kv_connector_extra_config"]["connectors"]]
    # LMCache's own config file names a server too: an inline key would silently override it.
    assert got == [None, "lm://127.0.0.1:65431", "lm://10.0.0.8:1234", None]


def test_a_port_already_in_use_stops_up_before_anything_starts(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        path = tmp_path / "kvfabric.yaml"
        path.write_text(yaml.safe_dump({"kv_transfer_config": LMCACHE,
                                        "lmcache_server": {"port": s.getsockname()[1]}}))
        assert kvfabric_main(["up", "--config", str(path)]) == 2
    assert "is already in use (an LMCache server running there already? `start: false` uses it" in \
        capsys.readouterr().err


# ---- the real topology -------------------------------------------------------------------------------------


def server_pids(port: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"storage_tiers.lmcache_server 127.0.0.1 {port}$"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def lmcache_healthy(port: int) -> bool:
    args = argparse.Namespace(address=f"127.0.0.1:{port}", service="lmcache", timeout=2.0)
    return health_cmd.run(args) == 0


def test_kvfabric_up_starts_the_lmcache_server_and_restarts_it_when_it_is_killed(tmp_path, default_model_dir):
    import openai

    from engine import LLM, SamplingParams
    from tests.topology import Topology, running

    port = free_port()
    rng = random.Random(7)
    prefix = [rng.randrange(100, 40000) for _ in range(160)]  # 10 blocks every prompt shares
    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(20)] for _ in range(4)]  # 11 full blocks each
    lmcache = {**LMCACHE["kv_connector_extra_config"], "remote_retry_interval_s": 0.2}  # no remote_url: `up` sets it
    # Prefix caching off on the engines: a reused block can only come from LMCache.
    topo = Topology(tmp_path, engine={"enable_prefix_caching": False},
                    extra={"kv_transfer_config": {"kv_connector": "lmcache",
                                                  "kv_connector_extra_config": lmcache},
                           "lmcache_server": {"port": port}})
    got = []
    with running(topo):
        c = openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(prompt):
            out = c.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
            got.append(out.choices[0].text)
            return {role: topo.stats(role) for role in ("prefill", "decode")}

        def delta(after, before, role, name):
            return after[role][f"connector_{name}"] - before[role].get(f"connector_{name}", 0)

        [first_pid] = server_pids(port)
        assert parent_of(first_pid) == topo.proc.pid and lmcache_healthy(port)
        zero = {role: topo.stats(role) for role in ("prefill", "decode")}
        a = complete(prompts[0])
        b = complete(prompts[1])
        # Every full prompt block reached decode through the server, the shared prefix included: the
        # second prefill found it there already and put only its own last block.
        assert delta(a, zero, "prefill", "remote_saved_blocks") == 11
        assert delta(a, zero, "decode", "remote_hit_tokens") == 176
        assert delta(b, a, "prefill", "remote_saved_blocks") == 1
        assert delta(b, a, "decode", "remote_hit_tokens") == 176 and delta(b, a, "decode", "loaded_blocks") == 11
        assert b["decode"]["connector_handoff_missed_tokens"] == 0

        os.kill(first_pid, signal.SIGKILL)  # everything it held is gone
        complete(prompts[2])  # most likely while it is down: recomputed, same tokens
        deadline = time.monotonic() + 30
        while not (server_pids(port) not in ([], [first_pid]) and lmcache_healthy(port)):
            assert time.monotonic() < deadline, "kvfabric up did not restart the LMCache server"
            time.sleep(0.2)
        assert parent_of(server_pids(port)[0]) == topo.proc.pid
        assert "lmcache-server exited with -9; restarting" in topo.log_path.read_text()
        time.sleep(0.3)  # past remote_retry_interval_s since any engine last found it down
        before = {role: topo.stats(role) for role in ("prefill", "decode")}
        d = complete(prompts[3])
        # Both engines reconnected to the restarted server: decode loads the fourth prompt from it.
        assert delta(d, before, "decode", "remote_hit_tokens") == 176
        assert delta(d, before, "decode", "handoff_missed_tokens") == 0
        for role in ("prefill", "decode"):
            assert d[role]["connector_remote_reconnects"] >= 1
            assert d[role]["connector_remote_failures"] >= 1
    assert server_pids(port) == []  # stopped with the rest: no orphan
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = LLM(dtype="float32", enable_prefix_caching=False).generate(prompts, greedy)
    assert got == [w.outputs[0].text for w in want]


def test_a_required_server_that_is_not_there_at_start_stops_up_with_a_clear_error(tmp_path, default_model_dir):
    # With remote_required: false the engine starts instead, the remote tier down, and reconnects
    # when the server appears: tests/test_lmcache.py drives that through the connector.
    from tests.topology import Topology

    port = free_port()  # `start: false`: up expects it running already, and nothing is
    topo = Topology(tmp_path, colocated=True, extra={"kv_transfer_config": LMCACHE,
                                                     "lmcache_server": {"port": port, "start": False}})
    try:
        assert topo.launch().proc.wait(timeout=120) == 1
        log = topo.log_path.read_text()
        assert f"lmcache connector: no LMCache server at 127.0.0.1:{port} (remote_url)" in log
        assert "or set remote_required: false to serve without the remote tier until it appears" in log
        assert "decode0 (exit status 1) exited during start-up; its log above says why" in log
    finally:
        topo.stop()
    assert topo.children() == []


def test_serve_points_its_connectors_at_a_fixed_lmcache_server(tmp_path, monkeypatch):
    """`kvfabric serve` (compose, another host) starts no server but, given the section with a fixed
    port, fills the lmcache connector's remote_url exactly as `up` would."""
    import argparse

    from kvfabric import serve_cmd

    cfg_file = tmp_path / "kvfabric.yaml"
    cfg_file.write_text("kv_transfer_config: {kv_connector: lmcache, kv_role: kv_producer}\n"
                        "lmcache_server: {host: 10.0.0.7, port: 6543, start: false}\n")
    seen = {}

    async def fake_serve_engine(cfg, role, host, port):
        seen["spec"] = cfg.kv_transfer_config

    monkeypatch.setattr(serve_cmd, "_serve_engine", fake_serve_engine)
    args = argparse.Namespace(config=str(cfg_file), role="prefill", host=None, port=50051)
    monkeypatch.setattr(serve_cmd, "apply_config_flags", lambda cfg, a: cfg)
    assert serve_cmd.run(args) == 0
    assert seen["spec"]["kv_connector_extra_config"]["remote_url"] == "lm://10.0.0.7:6543"
