"""The proxy's admission limits against a real topology (tiny model): body size → 413, concurrent
requests per API key → 429, queued prompt tokens → 429, each an OpenAI-style error, and every
slot and token given back when its response ends."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from proxy.limits import Limits
from tests.tiny_topology import tiny_topology
from tests.topology import running

MAX_BODY, PER_KEY, QUEUED = 4096, 2, 300


@pytest.fixture(scope="module")
def topo(tmp_path_factory, tiny_model_dir):
    model = tiny_model_dir("tiny-llama", with_tokenizer=True)
    t = tiny_topology(tmp_path_factory.mktemp("limits"), model, proxy={
        "max_body_bytes": MAX_BODY, "max_concurrent_per_key": PER_KEY, "max_queued_prompt_tokens": QUEUED})
    with running(t):
        yield t


def post(topo, body, key="a", **kw) -> httpx.Response:
    return httpx.post(topo.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


class Stream:
    """A long streaming request held open (until close) after its first event."""

    def __init__(self, topo, prompt_ids: list[int], key: str) -> None:
        body = {"prompt": prompt_ids, "max_tokens": 400, "stream": True, "ignore_eos": True, "temperature": 0}
        self.client = httpx.Client(timeout=120)
        self.cm = self.client.stream("POST", topo.url + "/v1/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"})
        self.resp = self.cm.__enter__()
        assert self.resp.status_code == 200
        self.lines = self.resp.iter_lines()
        assert next(line for line in self.lines if line.startswith("data:"))

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_body_bytes"):
        Limits(max_body_bytes=-1)


def test_body_larger_than_the_limit_gets_413(topo):
    big = {"prompt": "x" * MAX_BODY, "max_tokens": 1}
    assert_error(post(topo, big), 413, "request_too_large")
    # Chunked, with no Content-Length: the limit holds on the bytes actually read.
    data = json.dumps(big).encode()
    r = httpx.post(topo.url + "/v1/completions", content=iter([data[:1000], data[1000:]]), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")
    assert post(topo, {"prompt": "hello", "max_tokens": 2}).status_code == 200


def test_concurrent_requests_per_key_and_queued_tokens(topo):
    prompt = list(range(10, 110))  # 100 prompt tokens
    held = [Stream(topo, prompt, "a") for _ in range(PER_KEY)]
    try:
        assert_error(post(topo, {"prompt": [5, 6], "max_tokens": 1}, key="a"), 429, "concurrency_limit_exceeded")
        # Another key has its own slots; its 100 tokens bring the queue to exactly the limit.
        extra = Stream(topo, prompt, "b")
        try:
            assert_error(post(topo, {"prompt": prompt[:50], "max_tokens": 1}, key="c"), 429,
                         "queued_tokens_exceeded")
        finally:
            extra.close()
        assert post(topo, {"prompt": prompt[:50], "max_tokens": 1}, key="c").status_code == 200
    finally:
        for s in held:
            s.close()
    # Every slot comes back once the streams end (the client left: the proxy notices within moments).
    deadline = time.monotonic() + 20
    while True:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            post(topo, {"prompt": prompt, "max_tokens": 2}, key="a").status_code)) for _ in range(PER_KEY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if results == [200] * PER_KEY or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert results == [200] * PER_KEY


def test_rejected_requests_leave_the_engine_serving(topo):
    r = post(topo, {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
