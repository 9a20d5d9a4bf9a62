"""kv_connector/block_copy.py on the host: every path against a plain index copy, including ids that
look like a run by their ends only, many stretches (the gather paths), and one run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_connector import block_copy


def _blocks(n: int = 64, row: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, row), dtype=torch.uint8)


CASES = {
    "ends-like-a-run": [1, 3, 2, 4],  # last - first == len - 1, yet not consecutive
    "one-run": [5, 6, 7, 8, 9],
    "reversed": [9, 8, 7, 6],
    "scattered": list(np.random.default_rng(0).permutation(63)[:40] + 1),
}


@pytest.mark.parametrize("ids", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("max_copies", [256, 1], ids=["per-run", "gather"])
def test_gather_rows(ids, max_copies, monkeypatch):
    monkeypatch.setattr(block_copy, "_MAX_COPIES", max_copies)
    src = _blocks()
    dst = torch.zeros((len(ids), src.shape[1]), dtype=torch.uint8)
    block_copy.gather_rows(dst, src, ids)
    assert torch.equal(dst, src[torch.tensor(ids)])


@pytest.mark.parametrize("ids", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("max_copies", [256, 1], ids=["per-stretch", "gather"])
def test_copy_rows_between_host_caches(ids, max_copies, monkeypatch):
    monkeypatch.setattr(block_copy, "_MAX_COPIES", max_copies)
    src, dst = _blocks(), _blocks()
    want = dst.clone()
    dst_ids = np.asarray(list(reversed(range(10, 10 + len(ids)))) if len(ids) % 2 else range(20, 20 + len(ids)))
    want[torch.from_numpy(dst_ids)] = src[torch.tensor(ids)]
    block_copy.copy_rows(dst, dst_ids, src, np.asarray(ids))
    assert torch.equal(dst, want)
