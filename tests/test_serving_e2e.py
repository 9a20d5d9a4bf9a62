"""The product's spine end to end: real `kvfabric up` processes on 127.0.0.1, the official
`openai` client, zmq KV transfer between a prefill and a decode process."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.topology import Topology, running

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village by the sea,"]


@pytest.fixture(scope="module")
def topologies(tmp_path_factory, default_model_dir):
    workdir = tmp_path_factory.mktemp("topology")
    with running(Topology(workdir), Topology(workdir, colocated=True)) as (disagg, colocated):
        yield disagg, colocated


@pytest.fixture(scope="module")
def disagg(topologies):
    return topologies[0]


def client(topo) -> openai.OpenAI:
    return openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_engines_clean(topo) -> None:
    """No request running, no block in use beyond the prefix cache, none held for transfer."""
    def clean(s):
        return (s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"] - 1
                and s.get("num_held_for_transfer", 0) == 0)
    for role in ("prefill", "decode") if not topo.colocated else ("decode",):
        topo.wait_for(role, clean)


def test_openai_client_completions_and_chat(disagg):
    c = client(disagg)
    out = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == out.choices[0].text
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                     max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert_engines_clean(disagg)


def test_disaggregated_equals_colocated_equals_offline(topologies):
    from engine import LLM, SamplingParams

    disagg, colocated = topologies
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    offline = [o.outputs[0].text for o in LLM(dtype="float32").generate(PROMPTS, params)]
    before = disagg.stats("decode").get("connector_bytes_received", 0)
    for topo in (disagg, colocated):
        texts = [client(topo).completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
        assert texts == offline, topo.config_path.name
    # The KV really moved between the processes.
    assert disagg.stats("decode")["connector_bytes_received"] > before
    assert_engines_clean(disagg)


def test_sixteen_concurrent_streams_finish_and_engines_end_clean(disagg):
    async def one(i: int, ac: openai.AsyncOpenAI) -> int:
        n = 0
        stream = await ac.completions.create(model=MODEL, prompt=f"{i} apples and {i + 1} pears make",
                                             max_tokens=16, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.choices and ch.choices[0].text:
                n += 1
        return n

    async def main():
        ac = openai.AsyncOpenAI(base_url=disagg.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(i, ac) for i in range(16)))

    counts = asyncio.run(main())
    assert all(n >= 1 for n in counts) and len(counts) == 16
    assert_engines_clean(disagg)
    assert disagg.stats("prefill")["connector_held_requests"] == 0


def test_client_disconnect_mid_stream_aborts_decode(disagg):
    aborted = disagg.stats("decode")["num_aborted"]
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 1000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", disagg.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen >= 5:
                break  # leave mid-stream
    disagg.wait_for("decode", lambda s: s["num_aborted"] > aborted)
    assert_engines_clean(disagg)


def test_client_disconnect_during_prefill_aborts_the_prefill(disagg):
    aborted = disagg.stats("prefill")["num_aborted"]
    long_prompt = "word " * 1800  # several 512-token chunks: seconds of prefill on this CPU
    try:
        httpx.post(disagg.url + "/v1/completions", timeout=0.5,
                   json={"model": MODEL, "prompt": long_prompt, "max_tokens": 5})
    except httpx.TimeoutException:
        pass
    s = disagg.wait_for("prefill", lambda s: s["num_aborted"] > aborted)
    assert s["connector_held_requests"] == 0  # it never finished, so nothing is held for decode
    assert_engines_clean(disagg)


def test_bad_input_gets_an_openai_error_and_serving_continues(disagg):
    r = httpx.post(disagg.url + "/v1/completions", json={"model": MODEL, "prompt": "hi " * 3000, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(disagg.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404
    assert client(disagg).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_killed_decode_fails_its_request_and_service_recovers(disagg):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    got_error = False
    with httpx.stream("POST", disagg.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen == 3:
                    os.kill(disagg.pid_of("decode"), signal.SIGKILL)
                if '"error"' in line:
                    got_error = True
    assert got_error, "the client must see an error for the request whose decode died"
    # `up` restarts the decode process; the proxy serves again once it is healthy.
    deadline = time.monotonic() + 180
    while True:
        try:
            out = client(disagg).completions.create(model=MODEL, prompt="Hello", max_tokens=3)
            break
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert out.usage.completion_tokens == 3
    disagg.wait_for("prefill", lambda s: s["connector_held_requests"] == 0, timeout=30)


def test_replay_benchmark_against_the_real_topology(disagg, tmp_path):
    import json

    from bench.replay.cli import main
    from tests.test_bench_replay import TRACES

    if TRACES is None:
        pytest.skip("public traces not found")
    rc = main(["--trace", str(TRACES / "mooncake_conversation_trace_first_half.jsonl"), "--endpoint", disagg.url,
               "--num-requests", "6", "--length-scale", "0.01", "--time-scale", "0.001", "--max-model-len", "512",
               "--no-progress", "--output", str(tmp_path)])
    assert rc in (0, None)
    [report_path] = [p for p in tmp_path.glob("*.json")]
    report = json.loads(report_path.read_text())
    assert len(report["requests"]) == 6 and all(r.get("error") in (None, "") for r in report["requests"])
    assert {"ttft", "tpot", "itl", "e2e", "goodput"} <= set(report["metrics"])
    assert list(tmp_path.glob("*.png")) and list(tmp_path.glob("*.md"))
    assert_engines_clean(disagg)
