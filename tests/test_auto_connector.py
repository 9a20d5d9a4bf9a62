"""``kv_connector: auto``: the choice per topology, and that both sides of a real start agree."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

from kv_connector.auto import choose_connector, is_local, resolve_auto
from kvfabric.config import KVFabricConfig
from kvfabric.serve_cmd import connector_spec

OTHER_HOST = "192.0.2.7"  # TEST-NET-1: never this machine


def everything_works(name: str) -> bool:
    return True


def test_one_host_picks_ipc_on_gpu_and_on_cpu():
    name, why = choose_connector("127.0.0.1", "127.0.0.1", cuda=True, works=everything_works)
    assert name == "ipc" and "CUDA IPC" in why
    name, why = choose_connector("127.0.0.1", socket.gethostname(), cuda=False, works=everything_works)
    assert name == "ipc" and "host cache" in why


def test_one_host_without_shared_memory_falls_back_to_zmq():
    name, why = choose_connector("127.0.0.1", "127.0.0.1", cuda=False, works=lambda n: n != "ipc")
    assert name == "zmq" and "ipc" in why


def test_across_hosts_nixl_then_ucx_then_zmq():
    assert choose_connector(OTHER_HOST, "127.0.0.1", cuda=True, works=everything_works)[0] == "nixl"
    assert choose_connector(OTHER_HOST, "127.0.0.1", cuda=True, works=lambda n: n != "nixl")[0] == "ucx"
    name, why = choose_connector(OTHER_HOST, "127.0.0.1", cuda=True, works=lambda n: n == "ipc")
    assert name == "zmq" and "nixl" in why and "ucx" in why  # ipc is no option across hosts


def test_an_advertised_host_elsewhere_means_across_hosts():
    assert not is_local(OTHER_HOST) and is_local("127.0.0.1") and is_local("0.0.0.0")
    spec = {"kv_connector": "auto", "kv_connector_extra_config": {"advertise_host": OTHER_HOST}}
    resolved, why = resolve_auto(spec, "0.0.0.0", "127.0.0.1")
    assert resolved["kv_connector"] in ("nixl", "ucx", "zmq") and why.startswith("kv_connector auto → ")
    assert resolve_auto({"kv_connector": "zmq"}, "127.0.0.1", "127.0.0.1") == ({"kv_connector": "zmq"}, None)


def test_the_real_probe_on_this_machine_and_both_roles_agree(caplog):
    """What `serve` builds for each side: the same concrete connector, and the log line saying why."""
    cfg = KVFabricConfig()
    assert cfg.kv_transfer_config["kv_connector"] == "auto"
    with caplog.at_level(logging.INFO, logger="kvfabric.serve"):
        prefill, decode = connector_spec(cfg, "prefill"), connector_spec(cfg, "decode")
    assert prefill["kv_connector"] == decode["kv_connector"] == "ipc"  # this host has /dev/shm
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert "kv_connector auto → ipc because" in caplog.text
    assert decode["kv_load_failure_policy"] == "recompute"
    assert decode["kv_connector_extra_config"]["lease_s"] == 30.0


def test_up_resolves_once_and_logs_it(tmp_path, caplog, monkeypatch):
    """`up` writes the concrete name into the config its children read."""
    from kvfabric import up_cmd

    seen = {}

    def fake_children(cfg, path, colocated):
        seen["cfg"] = cfg
        raise SystemExit(0)  # stop before anything starts

    monkeypatch.setattr(up_cmd, "build_children", fake_children)
    monkeypatch.setattr(up_cmd.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    args = SimpleNamespace(config=None, port=None, colocated=False, ready_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="kvfabric.up"):
        try:
            up_cmd.run(args)
        except SystemExit:
            pass
    assert seen["cfg"].kv_transfer_config["kv_connector"] == "ipc"
    assert "kv_connector auto → ipc because" in caplog.text
