"""`preset:NAME` served through `kvfabric up`, and the proxy's adaptive disaggregation, end to end.

Real processes: a disaggregated topology (prefill + decode over zmq, ``disaggregation.policy:
adaptive``) and a colocated one, both serving the random ``preset:tiny-llama`` with the bundled
tokenizer. The decision rules themselves are tested on a real Router's instances below.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from proxy.adaptive import AdaptivePrefill
from proxy.config import DisaggregationConfig, ProxyConfig
from proxy.router import Router
from tests.topology import Topology, running

MODEL = "preset:tiny-llama"
SHORT = list(range(1000, 1012))  # 12 tokens
LONG = [1000 + (i * 7919) % 40000 for i in range(300)]


@pytest.fixture(scope="module")
def topologies(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adaptive")
    common = {"engine": {"max_model_len": 512}, "extra": {"model": MODEL}}
    adaptive = Topology(workdir, proxy={"disaggregation": {"policy": "adaptive", "short_prompt_tokens": 64}},
                        **common)
    with running(adaptive, Topology(workdir, colocated=True, **common)) as (disagg, colocated):
        yield disagg, colocated


def _client(topo) -> openai.OpenAI:
    return openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _decisions(topo) -> dict[tuple[str, str], float]:
    text = httpx.get(topo.url + "/metrics", timeout=10).text
    return {(m[0], m[1]): float(m[2]) for m in re.findall(
        r'kvfabric_prefill_decisions_total\{reason="(\w+)",where="(\w+)"\} ([0-9.e+]+)', text)}


def _complete(topo, prompt) -> str:
    return _client(topo).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text


def test_a_preset_serves_text_and_chat_with_the_bundled_tokenizer(topologies):
    disagg, _ = topologies
    c = _client(disagg)
    assert [m.id for m in c.models.list().data] == [MODEL]
    out = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                               extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.choices[0].text
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 6 and chat.usage.prompt_tokens > 20  # the chat template's tokens


def test_short_prompt_prefills_on_decode_long_prompt_on_prefill_tokens_as_colocated(topologies):
    disagg, colocated = topologies
    received = disagg.stats("decode").get("connector_bytes_received", 0)
    before = _decisions(disagg)

    short = _complete(disagg, SHORT)
    after_short = _decisions(disagg)
    assert after_short.get(("short_prompt", "decode"), 0) == before.get(("short_prompt", "decode"), 0) + 1
    assert disagg.stats("decode").get("connector_bytes_received", 0) == received  # no KV moved

    long = _complete(disagg, LONG)
    assert _decisions(disagg).get(("long_prompt", "prefill"), 0) == before.get(("long_prompt", "prefill"), 0) + 1
    assert disagg.stats("decode")["connector_bytes_received"] > received  # the prompt's KV came from prefill

    assert [short, long] == [_complete(colocated, SHORT), _complete(colocated, LONG)]


def test_decision_rules_on_a_router():
    async def main():
        cfg = ProxyConfig(prefill_addrs=["127.0.0.1:1"], decode_addrs=["127.0.0.1:2"])
        router = Router(cfg)
        try:
            [prefill], [decode] = router.prefill, router.decode
            decode.healthy = True
            policy = DisaggregationConfig(policy="adaptive", short_prompt_tokens=100, max_local_prefill_tokens=1000)
            adaptive = AdaptivePrefill(policy, router)
            assert adaptive.decide([1] * 50) == adaptive.decide([1] * 5000)  # no prefill instance: both local
            assert adaptive.decide([1] * 50).reason == "no_prefill_instance"
            prefill.healthy = True
            assert (adaptive.decide([1] * 50).reason, adaptive.decide([1] * 500).where) == ("short_prompt", "prefill")
            assert adaptive.decide([1] * 500, decode_cached_tokens=450).reason == "prefix_cached"
            # A queue of 4000 tokens at 1000 tokens/s (measured): 4 s to wait, 0.5 s to prefill locally.
            adaptive.load[prefill.address].tokens_per_s = 1000.0
            adaptive.load[prefill.address].pending = 4000
            assert adaptive.decide([1] * 500).reason == "prefill_queue"
            assert adaptive.decide([1] * 2000).reason == "long_prompt"  # over max_local_prefill_tokens
            adaptive.load[prefill.address].pending = 100
            assert adaptive.decide([1] * 500).reason == "long_prompt"
            for fixed, remote in (("always", True), ("never", False)):
                d = AdaptivePrefill(DisaggregationConfig(policy=fixed), router).decide([1] * 10)
                assert (d.remote, d.reason) == (remote, "policy")
            # Throughput from answers: 300 tokens ahead + 200 own in ~0.1 s.
            load = adaptive.load["x"]
            with load.track(300):
                with load.track(200) as done:
                    await asyncio.sleep(0.1)
                    done(0)
                    assert load.pending == 300
            assert load.pending == 0 and 2000 < load.tokens_per_s < 5500
            with pytest.raises(ValueError, match="policy"):
                DisaggregationConfig(policy="sometimes")
        finally:
            await router.stop()

    asyncio.run(main())
