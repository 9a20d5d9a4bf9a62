"""The Grafana dashboard queries only what is exported: every ``vllm:*`` / ``kvfabric_*`` name in its
PromQL appears in the /metrics of a real prefill + decode topology (storage tiers, KV events,
prefix routing) after a few requests."""

from __future__ import annotations

import json
import re

import httpx
import yaml

from tests.topology import REPO, Topology, running

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "kvfabric.json"
_NAME = re.compile(r"(?:vllm:|kvfabric_)[A-Za-z0-9_:]*")


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_valid_and_covers_what_the_issue_asks():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "kvfabric"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    text = " ".join(_queries(dash))
    for needed in ("kvfabric_instance_ttft_seconds", "kvfabric_instance_tpot_seconds", "kvfabric_engine_num_waiting",
                   "kvfabric_kv_cache_usage", "kvfabric_connector_bytes_sent", "_hits", "kvfabric_routing_decisions"):
        assert needed in text, needed


def test_every_metric_the_dashboard_queries_is_exported(tmp_path, default_model_dir):
    topo = Topology(tmp_path, extra={"tiers": {"cpu": {"capacity_bytes": "64MiB"},
                                               "disk": {"path": str(tmp_path / "kv-disk"), "capacity_bytes": "64MiB"}},
                                     "kv_events_config": {"enable_kv_cache_events": True}})
    cfg = yaml.safe_load(topo.config_path.read_text())
    cfg["proxy"]["routing_policy"] = "prefix"
    topo.config_path.write_text(yaml.safe_dump(cfg))
    with running(topo):
        prompt = list(range(2000, 2100))
        for tail in ([1], [2], [3]):
            r = httpx.post(topo.url + "/v1/completions", json={"prompt": prompt + tail, "max_tokens": 4,
                                                               "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
        httpx.post(topo.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "min_tokens": 5},
                   timeout=30)  # refused by the engine: an error the proxy counts
        topo.wait_for("prefill", lambda s: s.get("prefix_cache_hits", 0) > 0)
        exported = set()
        for line in httpx.get(topo.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    wanted = {n for q in _queries(json.loads(DASHBOARD.read_text())) for n in _NAME.findall(q)}
    missing = sorted(wanted - exported)
    assert not missing, f"the dashboard queries series nobody exports: {missing}\nexported: {sorted(exported)}"
