"""vLLM's serving extras and readiness on a real ``kvfabric up`` (prefill + decode, SmolLM2 on CPU):
/health and /v1/models are 503 until a complete path is up; /tokenize and /detokenize; echo,
logprobs, n > 1, stop strings and ids, seed — each works, or is a 400 naming the field."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.topology import Topology, stop_and_check

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def topo(tmp_path_factory, default_model_dir):
    t = Topology(tmp_path_factory.mktemp("extras"))
    t.launch()
    try:
        t.seen = []  # every answer the proxy gave while the topology started
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "kvfabric is serving at" not in t.log_path.read_text():
            for path in ("/health", "/v1/models"):
                try:
                    r = httpx.get(t.url + path, timeout=5)
                    t.seen.append((path, r.status_code, r.json()))
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.2)
        yield t.start()
    finally:
        stop_and_check(t)


def client(topo) -> openai.OpenAI:
    return openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_and_models_are_503_until_a_complete_path_is_healthy(topo):
    assert any(code == 503 for _, code, _ in topo.seen), "the proxy never answered before the engines were up"
    for path, code, body in topo.seen:
        if path == "/health":
            roles = {i["role"] for i in body["instances"] if i["healthy"]}
            assert (code == 200) == ({"prefill", "decode"} <= roles), body
            assert all(i["state"] in ("starting", "loading", "unreachable", "healthy") for i in body["instances"])
        elif code != 200:
            assert code == 503 and body["error"]["code"] == "service_unavailable"
    h = httpx.get(topo.url + "/health", timeout=5)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert {i["state"] for i in h.json()["instances"]} == {"healthy"}
    assert httpx.get(topo.url + "/v1/models", timeout=5).status_code == 200


def test_tokenize_round_trips(topo):
    text = "The quick brown fox, naïvely: 🦊!"
    r = httpx.post(topo.url + "/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 2048
    assert httpx.post(topo.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json() == {"prompt": text}
    chat = httpx.post(topo.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    out = client(topo).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=1)
    assert chat["count"] == out.usage.prompt_tokens and chat["token_strs"] is None
    for path, body, param in (("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
                              ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
                              ("/detokenize", {"tokens": [10**8]}, "tokens"),
                              ("/tokenize", {"model": "nope", "prompt": "a"}, "model")):
        r = httpx.post(topo.url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_echo_logprobs_n_stop_and_seed(topo):
    c = client(topo)
    prompt = "The capital of France is"
    base = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    echoed = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + base.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == echoed.choices[0].text

    lp = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3).choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) >= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    # Greedy: the sampled token is the top alternative.
    assert all(max(t.values()) == pytest.approx(x, abs=1e-4) for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)

    # Stop string: the text ends before it; a stop token id: finish_reason "stop".
    words = base.choices[0].text.split()
    cut = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[words[1]])
    assert cut.choices[0].finish_reason == "stop" and words[1] not in cut.choices[0].text
    ids = httpx.post(topo.url + "/tokenize", json={"prompt": base.choices[0].text,
                                                   "add_special_tokens": False}).json()["tokens"]
    by_id = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                 extra_body={"stop_token_ids": [ids[2]]})
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens == 3

    # n > 1 with a seed: n distinct samples, the same again for the same seed, streamed the same.
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=1234, n=3)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 18
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1
    texts = ["", "", ""]
    for ch in c.completions.create(**kw, stream=True):
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == [ch.text for ch in a.choices]
    chat_n = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       n=2, temperature=0)
    assert len(chat_n.choices) == 2 and chat_n.choices[0].message.content == chat_n.choices[1].message.content


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "echo": True, "logprobs": 2}, "echo"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_unsupported_extras_are_a_400_naming_the_field(topo, body, param):
    r = httpx.post(topo.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
