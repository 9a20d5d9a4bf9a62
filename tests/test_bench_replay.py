"""``kvfabric bench replay``: trace loaders, prompt synthesis, metric math, and replays against a
real HTTP server (tests/openai_stub.py in its own process), including one that errors and one
that dies mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.replay.cli import main
from bench.replay.client import RequestRecord, build_schedule
from bench.replay.metrics import output_throughput_timeline, parse_slo, summarize
from bench.replay.prompts import PromptBuilder, TextPrompts, word_token_pool
from bench.replay.server_metrics import server_metric_deltas
from bench.replay.traces import SyntheticSpec, TraceError, TraceRequest, load_trace
from tests.openai_stub import running_stub

REPO = Path(__file__).resolve().parents[1]


def _traces_dir() -> Path | None:
    for candidate in (os.environ.get("KVFABRIC_TRACES"), Path(__file__).resolve().parents[2] / "shared" / "traces"):
        if candidate and Path(candidate, "mooncake_synthetic_trace.jsonl").exists():
            return Path(candidate)
    return None


TRACES = _traces_dir()
needs_traces = pytest.mark.skipif(TRACES is None, reason="public traces not found: set KVFABRIC_TRACES or "
                                  "place them in ../shared/traces beside the repository")


# ------------------------------------------------------------------ trace loaders

@needs_traces
@pytest.mark.parametrize("name, count, first, mean_in, mean_out", [
    ("mooncake_synthetic_trace.jsonl", 3993, (40160, 6, 79), 15325.5, 149.1),
    ("mooncake_conversation_trace_first_half.jsonl", 5606, (6758, 500, 14), 12934.5, 345.6),
])
def test_mooncake_loader_reads_the_real_trace(name, count, first, mean_in, mean_out):
    trace = load_trace(TRACES / name)
    reqs = trace.requests
    assert trace.format == "mooncake" and len(reqs) == count
    assert (reqs[0].input_len, reqs[0].output_len, len(reqs[0].hash_ids)) == first
    assert reqs[0].arrival_s == 0.0 and all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert np.mean([r.input_len for r in reqs]) == pytest.approx(mean_in, abs=0.05)
    assert np.mean([r.output_len for r in reqs]) == pytest.approx(mean_out, abs=0.05)
    # one hash id per started 512-token block, as the trace's README says
    assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in reqs)


@needs_traces
def test_mooncake_timestamps_are_milliseconds():
    reqs = load_trace(TRACES / "mooncake_synthetic_trace.jsonl").requests
    assert reqs[2].arrival_s == pytest.approx(0.040)  # third line: "timestamp": 40


@needs_traces
@pytest.mark.parametrize("name, count, second_arrival, first, mean_in", [
    ("AzureLLMInferenceTrace_code.csv", 8819, 0.052, (4808, 10), 2047.8),
    ("AzureLLMInferenceTrace_conv.csv", 19366, 4.314579, (374, 44), 1154.7),
])
def test_azure_loader_reads_the_real_trace(name, count, second_arrival, first, mean_in):
    trace = load_trace(TRACES / name)
    reqs = trace.requests
    assert trace.format == "azure" and len(reqs) == count
    assert (reqs[0].arrival_s, reqs[0].input_len, reqs[0].output_len, reqs[0].hash_ids) == (0.0, *first, ())
    assert reqs[1].arrival_s == pytest.approx(second_arrival, abs=1e-9)
    assert np.mean([r.input_len for r in reqs]) == pytest.approx(mean_in, abs=0.05)
    assert 3400 < reqs[-1].arrival_s < 3700  # about an hour of wall clock


@pytest.mark.parametrize("lines, line_no, message", [
    (['{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [0]}', "{not json"], 2, "not JSON"),
    (['{"timestamp": 0, "input_length": 5, "hash_ids": [0]}'], 1, "missing field 'output_length'"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 1}', "",
      '{"timestamp": "soon", "input_length": 5, "output_length": 1}'], 3, "'timestamp' is not a number"),
    (['{"timestamp": 0, "input_length": "many", "output_length": 1}'], 1, "'input_length' is not a number"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}'], 1, "hash_ids"),
    (["[1, 2]"], 1, "not a JSON object"),
])
def test_bad_mooncake_line_is_named(tmp_path, lines, line_no, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert err.value.line == line_no and f"{path}:{line_no}:" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("rows, line_no, message", [
    (["2023-11-16 18:15:46.6805900,374,44", "2023-11-16 18:15:47.0,abc,3"], 3, "'ContextTokens' is not a number"),
    (["2023-11-16 18:15:46.6805900,374,44", "yesterday,1,3"], 3, "'TIMESTAMP' is not a date-time"),
    (["2023-11-16 18:15:46.6805900,374"], 2, "missing field 'GeneratedTokens'"),
    (["2023-11-16 18:15:46.6805900,374,4.5"], 2, "non-negative integer"),
])
def test_bad_azure_line_is_named(tmp_path, rows, line_no, message):
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert err.value.line == line_no and f"{path}:{line_no}:" in str(err.value) and message in str(err.value)


def test_azure_header_without_columns_is_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,tokens\n1,2\n")
    with pytest.raises(TraceError, match=r"bad.csv:1: header lacks column"):
        load_trace(path)


def test_synthetic_trace_has_requested_rate_burstiness_and_prefix_groups():
    spec = SyntheticSpec.parse("synthetic:n=4000,rate=8,cv=3,input=2048,output=100,groups=5,prefix=1024,seed=1")
    reqs = spec.generate().requests
    gaps = np.diff([r.arrival_s for r in reqs])
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    assert np.mean([r.input_len for r in reqs]) == pytest.approx(2048, rel=0.05)
    firsts = {r.hash_ids[:2] for r in reqs if len(r.hash_ids) >= 2}
    assert len(firsts) == 5  # 5 groups, each 2 shared 512-token blocks
    assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in reqs)
    tails = [h for r in reqs for h in r.hash_ids[2:]]
    assert len(tails) == len(set(tails))  # beyond the group prefix nothing is shared
    assert SyntheticSpec.parse("synthetic:n=50,seed=3").generate().requests == \
        SyntheticSpec.parse("synthetic:n=50,seed=3").generate().requests
    with pytest.raises(ValueError, match="unknown setting"):
        SyntheticSpec.parse("synthetic:bogus=1")


# ------------------------------------------------------------------ prompts

def _lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@needs_traces
def test_prompts_reproduce_the_traces_prefix_sharing_exactly():
    reqs = load_trace(TRACES / "mooncake_conversation_trace_first_half.jsonl").requests[:60]
    builder = PromptBuilder.for_vocab(32000, block_tokens=8, length_scale=1 / 64)
    prompts = [builder.build(r, i) for i, r in enumerate(reqs)]
    b = builder.block_tokens
    shared_pairs = 0
    for i in range(len(reqs)):
        for j in range(i + 1, len(reqs)):
            ids_i, ids_j = prompts[i].token_ids, prompts[j].token_ids
            common_blocks = _lcp(reqs[i].hash_ids, reqs[j].hash_ids)
            n = min(common_blocks * b, len(ids_i), len(ids_j))
            assert ids_i[:n] == ids_j[:n]
            shared_pairs += common_blocks > 0
            if (common_blocks + 1) * b <= min(len(ids_i), len(ids_j)):
                # the first block with different ids must differ as a block
                assert ids_i[common_blocks * b:(common_blocks + 1) * b] != ids_j[common_blocks * b:(common_blocks + 1) * b]
    assert shared_pairs > 100  # the conversation trace really shares prefixes
    assert [p.input_len for p in prompts] == [max(1, round(r.input_len / 64)) for r in reqs]


def test_same_hash_id_gives_the_same_block_and_distinct_ids_distinct_blocks():
    one = PromptBuilder.for_vocab(32000, block_tokens=16, seed=7)
    again = PromptBuilder.for_vocab(32000, block_tokens=16, seed=7)
    other_seed = PromptBuilder.for_vocab(32000, block_tokens=16, seed=8)
    assert one.block(42).tolist() == again.block(42).tolist()
    assert one.block(42).tolist() != other_seed.block(42).tolist()
    blocks = {tuple(one.block(h).tolist()) for h in range(5000)}
    assert len(blocks) == 5000
    assert all(1000 <= t < 32000 for blk in list(blocks)[:100] for t in blk)


def test_requests_without_hash_ids_share_nothing():
    builder = PromptBuilder.for_vocab(32000, block_tokens=4)
    a = builder.build(TraceRequest(0.0, 64, 8), 0).token_ids
    b = builder.build(TraceRequest(0.0, 64, 8), 1).token_ids
    assert len(a) == len(b) == 64 and _lcp(a, b) < 2
    assert builder.build(TraceRequest(0.0, 64, 8), 0).token_ids == a


def test_length_scaling_and_clipping():
    builder = PromptBuilder.for_vocab(1000, block_tokens=2, length_scale=0.5, max_model_len=100)
    assert builder.lengths(TraceRequest(0.0, 101, 3)) == (50, 2, False)  # round-half-even: 1.5 → 2
    assert builder.lengths(TraceRequest(0.0, 1000, 40)) == (80, 20, True)
    assert builder.lengths(TraceRequest(0.0, 10, 1000)) == (1, 99, True)
    prompt = builder.build(TraceRequest(0.0, 11, 1, hash_ids=(5,)), 0)  # 6 tokens: block 5 + unique tail
    assert prompt.token_ids[:2] == builder.block(5).tolist() and len(prompt.token_ids) == 6


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("river ocean mountain valley forest desert city village castle bridge tower garden "
             "window door table chair lamp book paper pencil stone water fire earth wind cloud").split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_text_prompts_tokenize_back_to_exactly_the_intended_ids():
    tokenizer = _tiny_tokenizer()
    pool = word_token_pool(tokenizer)
    assert len(pool) >= 20
    prompts = TextPrompts(PromptBuilder(pool, block_tokens=4), tokenizer)
    for i in range(20):
        p = prompts.build(TraceRequest(0.0, 30, 4, hash_ids=(0, i)), i)
        assert p.text is not None
        assert tokenizer.encode(p.text, add_special_tokens=False) == p.token_ids
    assert prompts.fallbacks == 0


def test_text_that_does_not_round_trip_falls_back_to_ids():
    class Lossy:
        def decode(self, ids):
            return "x"

        def encode(self, text, add_special_tokens=False):
            return [0]

    prompts = TextPrompts(PromptBuilder(np.arange(10, 50), block_tokens=4), Lossy())
    p = prompts.build(TraceRequest(0.0, 8, 2), 0)
    assert p.text is None and len(p.token_ids) == 8 and prompts.fallbacks == 1


# ------------------------------------------------------------------ schedule and metric math

def test_schedule_slices_scales_time_and_replaces_arrivals_with_poisson():
    reqs = [TraceRequest(t, 10, 2) for t in (0.0, 1.0, 3.0, 6.0, 10.0)]
    sched = build_schedule(reqs, start=1, num_requests=3, time_scale=0.5)
    assert [(s.index, s.send_at_s) for s in sched] == [(1, 0.0), (2, 1.0), (3, 2.5)]
    many = [TraceRequest(0.0, 10, 2)] * 4000
    times = [s.send_at_s for s in build_schedule(many, rate=20.0, seed=3)]
    assert times[0] == 0.0 and np.mean(np.diff(times)) == pytest.approx(1 / 20, rel=0.05)


def _rec(index, ttft=None, itl=(), tokens=0, error=None, sent=0.0):
    e2e = None if ttft is None else ttft + sum(itl)
    return RequestRecord(index, input_len=10, output_len=tokens, scheduled_s=sent, sent_s=sent, ttft_s=ttft,
                         e2e_s=e2e, output_tokens=tokens, itl_s=list(itl), error=error)


def test_metrics_on_hand_built_timings():
    records = [_rec(0, ttft=0.1, itl=(0.02, 0.03, 0.05), tokens=4),   # tpot 0.1/3, meets both SLOs
               _rec(1, ttft=0.5, itl=(0.2,), tokens=2, sent=0.5),     # tpot 0.2: misses tpot
               _rec(2, error="http_500"),
               _rec(3, ttft=3.0, tokens=1, sent=1.0)]                 # misses ttft; no tpot
    m = summarize(records, wall_s=2.0, slo=parse_slo("ttft=2s,tpot=100ms"))
    assert (m["requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["ttft"]["mean"] == pytest.approx(1.2)
    assert m["ttft"]["p50"] == pytest.approx(0.5)
    assert m["ttft"]["p90"] == pytest.approx(2.5)   # linear: 0.5 + 0.8 × (3.0 - 0.5)
    assert m["ttft"]["p99"] == pytest.approx(2.95)
    assert m["tpot"]["count"] == 2 and m["tpot"]["mean"] == pytest.approx((0.1 / 3 + 0.2) / 2)
    assert m["itl"]["count"] == 4 and m["itl"]["mean"] == pytest.approx(0.075) and m["itl"]["p50"] == pytest.approx(0.04)
    assert m["e2e"]["mean"] == pytest.approx((0.2 + 0.7 + 3.0) / 3)
    assert m["goodput"] == pytest.approx(0.5) and m["slo_attainment"] == pytest.approx(0.25)
    assert m["errors"] == {"http_500": 1}
    tl = output_throughput_timeline(records, bin_s=0.5)
    assert sum(tl["output_tokens_per_s"]) * 0.5 == pytest.approx(7) and sum(tl["requests_per_s"]) * 0.5 == 3


def test_slo_parsing_takes_units_and_refuses_guesses():
    assert parse_slo("ttft=2s,tpot=100ms") == {"ttft": 2.0, "tpot": pytest.approx(0.1)}
    assert parse_slo("e2e=1.5s, ttft=250us") == {"e2e": 1.5, "ttft": pytest.approx(250e-6)}
    for bad in ("ttft=2", "foo=1s", "ttft"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_server_counter_deltas_and_hit_rates():
    before = ("# TYPE kvfabric_prefix_cache_hits_total counter\nkvfabric_prefix_cache_hits_total 10\n"
              "# TYPE kvfabric_prefix_cache_queries_total counter\nkvfabric_prefix_cache_queries_total 100\n"
              "# TYPE vllm:kv_bytes_moved_total counter\nvllm:kv_bytes_moved_total{tier=\"cpu\"} 5\n"
              "# TYPE kvfabric_running gauge\nkvfabric_running 3\n"
              "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n")
    after = before.replace("hits_total 10", "hits_total 40").replace("queries_total 100", "queries_total 160") \
        .replace("} 5", "} 4101").replace("running 3", "running 0").replace("seconds_total 1", "seconds_total 9")
    d = server_metric_deltas(before, after)
    assert d["counters"] == {"kvfabric_prefix_cache_hits_total": 30, "kvfabric_prefix_cache_queries_total": 60,
                             'vllm:kv_bytes_moved_total{tier="cpu"}': 4096}
    assert d["gauges"] == {"kvfabric_running": 0}
    assert d["hit_rates"] == {"kvfabric_prefix_cache_hit_rate": pytest.approx(0.5)}
    assert server_metric_deltas(None, after) == {"available": False}


# ------------------------------------------------------------------ replays against a real server

def _replay(tmp_path, url, *extra, trace=None):
    out = tmp_path / "out"
    rc = main(["--trace", str(trace or TRACES / "mooncake_conversation_trace_first_half.jsonl"), "--endpoint", url,
               "--length-scale", str(1 / 64), "--no-progress", "--output", str(out), *extra])
    assert rc == 0
    return out


@needs_traces
def test_time_scaled_replay_writes_a_complete_report(tmp_path):
    with running_stub("--ttft", "0.02", "--itl", "0.002") as url:
        out = _replay(tmp_path, url + "/v1", "--num-requests", "30", "--start", "5", "--time-scale", "0.01",
                      "--warmup", "2", "--max-concurrency", "8", "--slo", "ttft=1s,tpot=50ms")
        sent = httpx.get(url + "/stub/requests", trust_env=False).json()
    report = json.loads((out / "replay.json").read_text())
    m = report["metrics"]
    assert (m["requests"], m["completed"], m["failed"]) == (30, 30, 0)
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert set(m[key]) >= {"mean", "p50", "p90", "p99"} and m[key]["p50"] > 0
    assert m["ttft"]["p50"] >= 0.02 and m["goodput"] > 0 and m["slo_attainment"] == 1.0
    trace = load_trace(TRACES / "mooncake_conversation_trace_first_half.jsonl").requests[5:35]
    expected_out = [max(1, round(r.output_len / 64)) for r in trace]
    assert [r["output_tokens"] for r in report["requests"]] == expected_out
    assert [r["index"] for r in report["requests"]] == list(range(5, 35))
    # what went over the wire: 2 warm-up + 30 timed, token-id prompts, ignore_eos, usage requested
    assert len(sent) == 32 and sorted(s["max_tokens"] for s in sent[2:]) == sorted(expected_out)
    assert all(s["prompt_kind"] == "ids" and s["ignore_eos"] is True and s["stream"] is True
               and s["stream_options"] == {"include_usage": True} for s in sent)
    s = report["settings"]
    assert (s["length_scale"], s["block_tokens"], s["time_scale"], s["warmup"]) == (1 / 64, 8, 0.01, 2)
    assert report["endpoint"]["models"] == ["stub-model"] and report["environment"]["commit"]
    counters = report["server_metrics"]["counters"]
    assert counters["kvfabric_requests_total"] == 30  # warm-up excluded
    assert "process_cpu_seconds_total" not in counters
    assert 0 < report["server_metrics"]["hit_rates"]["kvfabric_prefix_cache_hit_rate"] < 1
    md = (out / "replay.md").read_text()
    assert "| TTFT |" in md and "goodput" in md and "lengths × 0.015625, 8 tokens per hash block" in md
    for png in ("replay_latency_cdf.png", "replay_throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_sweep_and_compare_merge_runs(tmp_path):
    trace = "synthetic:n=12,input=1024,output=256,groups=2,prefix=512"
    with running_stub("--ttft", "0.01", "--itl", "0.001") as url:
        single = _replay(tmp_path / "a", url, "--rate", "50", "--label", "colocated", trace=trace)
        sweep = _replay(tmp_path / "b", url, "--sweep", "40,80", "--label", "disagg", trace=trace)
    assert json.loads((sweep / "sweep.json").read_text())["rates"] == [40.0, 80.0]
    assert (sweep / "rate_80" / "replay.json").exists() and (sweep / "sweep_goodput.png").exists()
    out = tmp_path / "cmp"
    assert main(["--compare", str(single / "replay.json"), str(sweep / "sweep.json"), "--output", str(out)]) == 0
    merged = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in merged["runs"]] == ["colocated", "disagg @ 40", "disagg @ 80"]
    md = (out / "compare.md").read_text()
    assert "| colocated | 50 |" in md and "| disagg @ 80 | 80 |" in md
    for png in ("compare_latency_cdf.png", "compare_throughput.png", "compare_goodput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_http_errors_are_recorded_per_request(tmp_path):
    with running_stub("--error-every", "3") as url:
        out = _replay(tmp_path, url, "--rate", "100", trace="synthetic:n=9,input=512,output=128")
    report = json.loads((out / "replay.json").read_text())
    assert report["metrics"]["errors"] == {"http_500": 3} and report["metrics"]["completed"] == 6
    failed = [r for r in report["requests"] if r["error"]]
    assert len(failed) == 3 and all("injected failure" in r["error_detail"] and r["ttft_s"] is None for r in failed)
    assert "`http_500` × 3" in (out / "replay.md").read_text()


def test_a_server_that_dies_mid_run_is_reported_not_crashed_on(tmp_path):
    with running_stub("--die-after", "3", "--ttft", "0.01", "--itl", "0.01") as url:
        out = _replay(tmp_path, url, "--rate", "10", "--model", "stub-model",
                      trace="synthetic:n=10,input=512,output=640,dist=fixed")
    report = json.loads((out / "replay.json").read_text())
    m = report["metrics"]
    assert m["requests"] == 10 and m["completed"] + m["failed"] == 10
    assert m["errors"].get("connect_error", 0) >= 1           # sent after the process was gone
    assert m["errors"].get("connection_lost", 0) + m["errors"].get("incomplete_stream", 0) >= 1  # cut mid-stream
    assert set(m["errors"]) <= {"connect_error", "connection_lost", "incomplete_stream"}
    assert report["server_metrics"]["available"] is False
    assert (out / "replay.md").exists() and (out / "replay_latency_cdf.png").exists()


def test_no_server_at_all_gives_connect_errors(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _replay(tmp_path, f"http://127.0.0.1:{port}", "--model", "m", "--rate", "200",
                  trace="synthetic:n=4,input=512,output=64")
    report = json.loads((out / "replay.json").read_text())
    assert report["metrics"]["errors"] == {"connect_error": 4} and report["metrics"]["goodput"] == 0


def test_duration_limit_stops_sending(tmp_path):
    out = _replay(tmp_path, "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--duration", "0.001",
                  trace="synthetic:n=5,input=512,output=64")
    report = json.loads((out / "replay.json").read_text())
    assert report["metrics"]["requests"] == 1 and report["unsent_after_duration"] == 4
    assert "4 request(s) scheduled after the duration limit were not sent" in (out / "replay.md").read_text()


def test_bad_arguments_give_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["--trace", str(tmp_path / "missing.jsonl"), "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "trace file not found" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "bench.replay", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--block-tokens" in done.stdout and "--compare" in done.stdout
