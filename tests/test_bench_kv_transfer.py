"""The transfer benchmark's two-process mode on CPU: a real producer process, bytes checked
against the pattern the producer wrote, and the report fields the device runs are read by."""

from __future__ import annotations

import torch

from bench.kv_transfer import SHAPES, block_bytes, summary
from bench.kv_transfer_2proc import fill_pattern, matches_pattern, run_two_process


def test_pattern_names_every_block_and_position():
    cache = torch.empty(5, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    fill_pattern(cache)
    assert matches_pattern(cache, [1, 2, 3], [1, 2, 3])
    assert not matches_pattern(cache, [1, 2, 3], [1, 3, 2])  # a swapped block shows
    cache.view(torch.uint8).view(5, -1)[4, 7] += 1
    assert not matches_pattern(cache, [4], [4])  # so does one wrong byte


def test_two_process_mode_moves_intact_bytes_and_reports_against_the_peak():
    nbytes = 64 * block_bytes(SHAPES["small"][0])
    data = run_two_process(["zmq"], [nbytes, 4 * nbytes], repeats=1, device="cpu", shapes=["small"])
    rows = data["results"]
    assert [r["num_blocks"] for r in rows] == [64, 256]
    assert all(r["bytes_equal"] and r["gb_per_s"] > 0 and r["first_seconds"] > 0 for r in rows), rows
    assert data["bound"] == "memcpy" and 0 < rows[1]["vs_peak"] < 1
    assert data["placement"] == "two processes, cpu → cpu"
    assert "zmq" in summary([data]) and "memcpy" in summary([data])
