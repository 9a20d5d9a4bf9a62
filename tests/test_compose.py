"""docker-compose.yml agrees with the real CLI and the mounted config (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvfabric.cli import build_parser
from kvfabric.config import KVFabricConfig
from kvfabric.overrides import apply_config_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _config_for(compose) -> KVFabricConfig:
    [mount] = {v for s in compose["services"].values() if "command" in s for v in s.get("volumes", [])
               if v.endswith(":/etc/kvfabric/config.yaml:ro")}
    return KVFabricConfig.load(REPO / mount.split(":")[0])


def test_every_service_command_parses_with_the_real_cli(compose):
    parser = build_parser()
    for name, service in compose["services"].items():
        if "command" not in service:
            continue
        args = parser.parse_args(service["command"])
        assert args.command == "serve" and args.role == name
        apply_config_flags(KVFabricConfig.load(REPO / "docker" / "kvfabric.yaml"), args)  # no unknown keys
        health = service["healthcheck"]["test"]
        if health[1] == "kvfabric":
            assert parser.parse_args(health[2:]).command == "health"


def test_ports_and_config_agree(compose):
    cfg = _config_for(compose)
    services = compose["services"]
    parser = build_parser()
    prefill = parser.parse_args(services["prefill"]["command"])
    decode = parser.parse_args(services["decode"]["command"])
    proxy = parser.parse_args(services["proxy"]["command"])
    assert prefill.port == cfg.prefill.ports[0] and decode.port == cfg.decode.ports[0]
    assert proxy.prefill == [f"prefill:{prefill.port}"] and proxy.decode == [f"decode:{decode.port}"]
    assert services["proxy"]["ports"] == [f"{proxy.port}:{proxy.port}"]
    for role, args in (("prefill", prefill), ("decode", decode)):
        assert services[role]["healthcheck"]["test"][3] == f"127.0.0.1:{args.port}"
        assert services[role]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # The producer binds on all interfaces inside the network but must advertise a reachable name.
    extra = cfg.kv_transfer_config.get("kv_connector_extra_config", {})
    assert cfg.kv_transfer_config["kv_ip"] == "0.0.0.0" and extra.get("advertise_host") == "prefill"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_validates():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    r = subprocess.run(["docker", "compose", "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
