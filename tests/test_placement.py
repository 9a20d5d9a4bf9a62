"""GPU placement of `kvfabric up`'s engines, each engine's KV budget, and what a preset directory holds.

No GPU here: placement is pure arithmetic over GPU ids, and the budget takes the device's memory
figures as numbers (fake ones below, the only stand-in: the real ones need a GPU).
"""

from __future__ import annotations

import json

import pytest

from engine.kv_budget import GiB, GPUMemory, activation_bytes, kv_budget_bytes
from kvfabric.config import KVFabricConfig
from kvfabric.placement import parse_gpus, place
from kvfabric.up_cmd import build_children


def _roles(prefill=1, decode=1, dcp=1, prefill_gpus=None, decode_gpus=None, pu=None, du=None):
    return [("prefill", prefill, 1, parse_gpus(prefill_gpus, "prefill.gpus"), pu),
            ("decode", decode, dcp, parse_gpus(decode_gpus, "decode.gpus"), du)]


def test_two_gpus_put_prefill_and_decode_apart_with_their_own_memory():
    out = place(["0", "1"], _roles(), None)
    assert [p.gpus for p in out["prefill"]] == [["0"]] and [p.gpus for p in out["decode"]] == [["1"]]
    assert out["prefill"][0].gpu_memory_utilization == out["decode"][0].gpu_memory_utilization == 0.9
    # The child sees its GPU as cuda:0 and the peer's after it (CUDA IPC needs it visible).
    assert out["decode"][0].cuda_visible_devices(["0", "1"]) == "1,0"


def test_one_gpu_is_shared_and_its_memory_split():
    out = place(["0"], _roles(), None)
    assert out["prefill"][0].gpus == out["decode"][0].gpus == ["0"]
    assert out["prefill"][0].gpu_memory_utilization == out["decode"][0].gpu_memory_utilization == 0.45
    # Given explicitly, the fraction is each engine's own share of the total.
    explicit = place(["0"], _roles(), 0.4)
    assert explicit["decode"][0].gpu_memory_utilization == 0.4
    with pytest.raises(ValueError, match="more than all of its memory"):
        place(["0"], _roles(), 0.9)


def test_explicit_pools_dcp_ranks_and_bad_specs():
    out = place(["0", "1", "2", "3"], _roles(decode=1, dcp=2, prefill_gpus="3", decode_gpus="1,2"), None)
    assert out["prefill"][0].gpus == ["3"] and out["decode"][0].gpus == ["1", "2"]
    # A role with a pool of its own leaves the other the remaining GPUs.
    out = place(["0", "1"], _roles(prefill_gpus="1"), None)
    assert out["prefill"][0].gpus == ["1"] and out["decode"][0].gpus == ["0"]
    # More instances than GPUs wrap around.
    out = place(["0", "1"], _roles(prefill=2, decode=2), None)
    assert [p.gpus for p in out["prefill"] + out["decode"]] == [["0"], ["1"], ["0"], ["1"]]
    assert out["decode"][0].gpu_memory_utilization == 0.45
    with pytest.raises(ValueError, match="not visible"):
        place(["0"], _roles(decode_gpus="5"), None)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        place(["0", "1"], _roles(dcp=2, decode_gpus="1"), None)
    with pytest.raises(ValueError, match="distinct GPU ids"):
        parse_gpus("0,,1", "decode.gpus")
    assert parse_gpus([0, 1], "x") == ["0", "1"] and parse_gpus(None, "x") is None
    # On CPU nothing is placed and each engine keeps its own default.
    assert place([], _roles(), None)["decode"][0].gpus == []


def test_up_children_get_their_gpus_and_fractions(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = KVFabricConfig.from_dict({"device": "cuda", "decode": {"gpus": "0", "gpu_memory_utilization": 0.3},
                                    "prefill": {"gpus": "1"}})
    children, _ = build_children(cfg, tmp_path / "c.yaml", colocated=False)
    by_name = {c.name: c for c in children}
    assert by_name["prefill0"].env["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert by_name["decode0"].env["CUDA_VISIBLE_DEVICES"] == "0,1"
    argv = by_name["decode0"].argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"
    assert "CUDA_VISIBLE_DEVICES" not in by_name["proxy"].env
    cpu, _ = build_children(KVFabricConfig.from_dict({"device": "cpu"}), tmp_path / "c.yaml", colocated=True)
    assert all(not c.env and "--gpu-memory-utilization" not in c.argv for c in cpu)


def test_kv_budget_is_a_share_of_total_memory_not_of_what_is_free():
    total = 140 * GiB
    act = activation_bytes(2048, 4096, 14336, 49152, 128, 2)
    assert 200 << 20 < act < 400 << 20  # Llama-3.1-8B shape, bf16: a few hundred MiB
    # Decode starts after prefill already took its 0.4 (16 GiB weights + KV): decode still gets
    # its own 0.4 minus its own weights, exactly what prefill got.
    first = kv_budget_bytes(GPUMemory(total, free=total - 1 * GiB, own=16 * GiB), 0.4, act)
    second = kv_budget_bytes(GPUMemory(total, free=total - 57 * GiB, own=16 * GiB), 0.4, act)
    assert first == second == int(total * 0.4) - 16 * GiB - act - GiB
    assert second > 38 * GiB
    # A neighbour that took more than its share: cut to what is free, never negative.
    squeezed = kv_budget_bytes(GPUMemory(total, free=20 * GiB, own=16 * GiB), 0.4, act)
    assert squeezed == 20 * GiB - act - GiB
    assert kv_budget_bytes(GPUMemory(total, free=GiB, own=16 * GiB), 0.4, act) == 0
    with pytest.raises(ValueError):
        kv_budget_bytes(GPUMemory(total, total, 0), 1.5, act)


def test_preset_directory_has_the_bundled_tokenizer_and_its_vocabulary(tmp_path, monkeypatch):
    from engine.models import resolve_model_path
    from engine.models.config import PRESETS
    from engine.tokenizer import load_tokenizer

    monkeypatch.setenv("KVFABRIC_CACHE_DIR", str(tmp_path))
    path = resolve_model_path("preset:llama-3.1-8b")
    cfg = json.loads((path / "config.json").read_text())
    shape = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")}
    assert {k: cfg[k] for k in shape} == shape  # the 8B shape, the tokenizer's vocabulary
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (49152, 1, 2)
    tokenizer = load_tokenizer(path)
    assert len(tokenizer) == cfg["vocab_size"] and tokenizer.eos_token_id == 2 and tokenizer.chat_template
    assert resolve_model_path("preset:llama-3.1-8b") == path  # idempotent
