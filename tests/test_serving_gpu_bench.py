"""bench/serving_gpu.py on CPU: a real `kvfabric up` of the tiny preset per mode, a short sweep,
JSON + markdown + PNG; a mode that cannot start is recorded and the others still run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import serving_gpu

TRACE = (Path(os.environ.get("KVFABRIC_TRACES") or Path(__file__).resolve().parents[2] / "shared" / "traces")
         / "mooncake_conversation_trace_first_half.jsonl")


def test_mode_names():
    assert serving_gpu.Mode.parse("colocated").colocated
    assert serving_gpu.Mode.parse("ipc+adaptive") == serving_gpu.Mode("ipc+adaptive", False, "ipc", "adaptive")
    with pytest.raises(Exception, match="expected colocated"):
        serving_gpu.Mode.parse("zmq+sometimes")


@pytest.mark.skipif(not TRACE.is_file(), reason="no Mooncake trace: set KVFABRIC_TRACES or place it in ../shared/traces")
def test_a_cpu_dry_run_measures_each_mode_and_survives_a_failing_one(tmp_path):
    code = serving_gpu.main([
        "--device", "cpu", "--model", "preset:tiny-llama", "--modes", "colocated,no-such-connector",
        "--rates", "4", "--num-requests", "3", "--length-scale", "0.02", "--clip-tokens", "400",
        "--max-model-len", "512", "--num-kv-blocks", "400", "--max-num-seqs", "8", "--warmup", "0",
        "--ready-timeout", "240", "--trace", str(TRACE), "--out", str(tmp_path)])
    assert code == 1  # one mode failed
    report = json.loads((tmp_path / "serving_gpu.json").read_text())
    colocated, bad = report["modes"]
    [row] = colocated["rates"]
    assert row["rate"] == 4 and row["completed"] == 3 and row["errors"] == 0
    assert row["ttft_p50_ms"] > 0 and row["goodput_req_per_s"] > 0
    assert row["prefill_decisions"] == {"decode/no_prefill_instance": 3.0}
    assert "error" in bad and "no-such-connector" in bad["log_tail"]
    assert (tmp_path / "serving_gpu.png").stat().st_size > 10_000
    assert "| colocated | 4 |" in (tmp_path / "serving_gpu.md").read_text()
