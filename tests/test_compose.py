"""docker-compose.yml agrees with the real CLI and the mounted config (no Docker engine here): the
default config (zmq), and the LMCache one that the ``lmcache`` profile's ``lmcache-server`` serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvfabric.cli import build_parser
from kvfabric.config import KVFabricConfig
from kvfabric.overrides import apply_config_flags
from storage_tiers import lmcache_server

REPO = Path(__file__).resolve().parents[1]
LMCACHE_ENV = {"KVFABRIC_CONFIG": "./docker/kvfabric-lmcache.yaml"}  # what the file's header says to set


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], value)


def _config_path(compose, env: dict[str, str]) -> Path:
    [mount] = {v for s in compose["services"].values() if "command" in s for v in s.get("volumes", [])
               if v.endswith(":/etc/kvfabric/config.yaml:ro")}
    return REPO / _interpolate(mount.split(":/etc/")[0], env)


def _config_for(compose, env: dict[str, str] | None = None) -> KVFabricConfig:
    return KVFabricConfig.load(_config_path(compose, env or {}))


def _parse(service):
    """A service's command, parsed by what its container runs: ``kvfabric`` or the LMCache server."""
    if service.get("entrypoint") == ["python", "-m", "storage_tiers.lmcache_server"]:
        return lmcache_server.build_parser().parse_args(service["command"])
    assert "entrypoint" not in service, "every other service runs the image's entrypoint, kvfabric"
    return build_parser().parse_args(service["command"])


def test_every_service_command_parses_with_the_real_cli(compose):
    parser = build_parser()
    for name, service in compose["services"].items():
        if "command" not in service:
            continue
        args = _parse(service)
        if name != "lmcache-server":
            assert args.command == "serve" and args.role == name
            for env in ({}, LMCACHE_ENV):  # no unknown keys in either config
                apply_config_flags(_config_for(compose, env), args)
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


def test_the_default_config_needs_no_lmcache_server(compose):
    assert _config_for(compose).kv_transfer_config["kv_connector"] != "lmcache"
    assert compose["services"]["lmcache-server"]["profiles"] == ["lmcache"]
    for role in ("prefill", "decode"):
        # Not required: without the profile the engines start alone; with it they wait for it.
        assert compose["services"][role]["depends_on"]["lmcache-server"] == {"condition": "service_healthy",
                                                                          "required": False}


def test_the_lmcache_config_points_prefill_and_decode_at_the_lmcache_server_service(compose):
    services = compose["services"]
    server = _parse(services["lmcache-server"])
    assert server.host == "0.0.0.0"  # reachable from the other containers
    assert services["lmcache-server"]["healthcheck"]["test"][2:] == ["health", f"127.0.0.1:{server.port}",
                                                                   "--service", "lmcache"]
    assert "deploy" not in services["lmcache-server"]  # CPU only: no GPU reserved for it
    cfg = _config_for(compose, LMCACHE_ENV)
    assert cfg.kv_transfer_config["kv_connector"] == "lmcache"
    assert cfg.kv_transfer_config["kv_connector_extra_config"]["remote_url"] == f"lm://lmcache-server:{server.port}"
    assert cfg.kv_transfer_config["kv_connector_extra_config"]["remote_required"] is True
    for role in ("prefill", "decode"):
        assert _parse(services[role]).port == getattr(cfg, role).ports[0]
    header = (REPO / "docker-compose.yml").read_text().split("x-kvfabric")[0]
    assert "KVFABRIC_CONFIG=./docker/kvfabric-lmcache.yaml docker compose --profile lmcache up" in header


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
@pytest.mark.parametrize("profile, env", [(None, {}), ("lmcache", LMCACHE_ENV)])
def test_docker_compose_config_validates(profile, env):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    argv = ["docker", "compose"] + (["--profile", profile] if profile else []) + ["config", "-q"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr


class _ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags (``!reset``, ``!override``) read as plain values."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None))


def test_gpu_engines_share_the_host_ipc_namespace_and_the_cpu_override_drops_the_gpus(compose):
    services = compose["services"]
    for role in ("prefill", "decode"):
        assert services[role]["ipc"] == "host"  # the ipc connector maps memory across the two containers
        assert services[role]["restart"] == "unless-stopped"
    assert services["proxy"]["depends_on"] == {"prefill": {"condition": "service_healthy"},
                                               "decode": {"condition": "service_healthy"}}
    cpu = yaml.load((REPO / "docker-compose.cpu.yml").read_text(), Loader=_ComposeLoader)
    assert cpu["services"] == {"prefill": {"deploy": {}}, "decode": {"deploy": {}}}
    header = (REPO / "docker-compose.yml").read_text().split("x-kvfabric")[0]
    assert "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up" in header
    assert _config_for(compose).proxy.host == "0.0.0.0"  # the published port reaches it


def test_the_base_image_is_a_build_argument_defaulting_to_the_public_python_image(compose):
    build = compose["x-kvfabric"]["build"]
    assert build["args"]["BASE_IMAGE"] == "${KVFABRIC_BASE_IMAGE:-python:3.11-slim}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in dockerfile


def test_grafana_provisions_prometheus_and_the_dashboards_folder(compose):
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"])
    assert mounts == {"./docker/grafana/provisioning": "/etc/grafana/provisioning",
                      "./docker/grafana/dashboards": "/var/lib/grafana/dashboards"}
    provisioning = REPO / "docker" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    prometheus = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["proxy:8000"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "kvfabric.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_cpu_override_validates_without_gpu_reservations():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    r = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "config",
                        "--format", "json"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    for role in ("prefill", "decode"):
        assert "devices" not in json.dumps(services[role].get("deploy", {})), services[role]
        assert services[role]["ipc"] == "host"
