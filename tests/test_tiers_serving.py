"""Storage tiers across the real disaggregated topology: a second request sharing a 1k-token
prefix with the first is served from the prefill side's tiers (counters prove it)."""

from __future__ import annotations

import random

import openai

from tests.topology import Topology, running

MODEL = "SmolLM2-135M-Instruct"


def test_shared_prefix_is_loaded_from_the_tiers_across_the_disaggregated_topology(tmp_path, default_model_dir):
    # Prefix caching off on the engines: every reused block must come from the storage tiers.
    topo = Topology(tmp_path, engine={"enable_prefix_caching": False},
                    extra={"tiers": {"cpu": {"capacity_bytes": "64MiB"},
                                     "disk": {"path": str(tmp_path / "kv-disk"), "capacity_bytes": "256MiB"}}})
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(1024)]
    with running(topo):
        c = openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        first = c.completions.create(model=MODEL, prompt=prefix + [11, 12, 13], max_tokens=8, temperature=0)
        hits_before = topo.stats("prefill").get("connector_connectors_tiered_hit_tokens", 0)
        second = c.completions.create(model=MODEL, prompt=prefix + [21, 22, 23], max_tokens=8, temperature=0)
        stats = topo.stats("prefill")
        assert second.usage.prompt_tokens_details.cached_tokens >= 1024
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert stats["connector_connectors_tiered_hit_tokens"] - hits_before >= 1024
    # The tier-served request decodes exactly what a recomputed one does.
    from engine import LLM, SamplingParams

    recomputed = LLM(dtype="float32", enable_prefix_caching=False).generate(
        [prefix + [21, 22, 23]], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert second.choices[0].text == recomputed.outputs[0].text
