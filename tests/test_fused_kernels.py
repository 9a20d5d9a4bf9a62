"""The fused Triton kernels of ``engine/kernels`` against the torch expressions they replace.

Runs on a CUDA device (``-m gpu``); with ``TRITON_INTERPRET=1`` also on the CPU through Triton's
interpreter, on smaller shapes. Every check draws fresh random inputs and poisons what the kernel
must write (NaN), so an unwritten element fails. The residual sum and the KV-cache bytes must be
bit-identical to the torch path (the same roundings in the same order); normed, activated and
rotated values are held to ‖out − ref‖ / ‖ref‖ bounds, the reference computed from the same
inputs by the model's own torch code. (Triton 3.6's interpreter truncates float32 -> bfloat16
instead of rounding to nearest, so under it the exact checks become bounds too.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_env import DEVICE, FULL, MARKS, rel_error, seed

pytestmark = MARKS
triton = pytest.importorskip("triton")

from engine.kernels.rms_norm import rms_norm  # noqa: E402
from engine.kernels.rope_kv_write import rope_kv_write  # noqa: E402
from engine.kernels.silu_mul import silu_mul  # noqa: E402
from engine.models.decoder import RMSNorm  # noqa: E402
from engine.models.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
TOKENS = [1, 3, 17] + ([300, 4096] if FULL else [])


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    if FULL or out.dtype != torch.bfloat16:
        return torch.equal(out, ref)
    return _rel(out, ref) < TOL[torch.bfloat16]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (or NaN) elements"
    return rel_error(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576] + ([4096, 5120] if FULL else []))
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_with_and_without_residual(tokens, hidden, dtype):
    seed(tokens, hidden, dtype)
    norm = RMSNorm(hidden, 1e-5, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden) * 0.5 + 1)
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(tokens, hidden, device=DEVICE).to(dtype)

    ref = norm(x)
    assert _rel(rms_norm(x, norm.weight, norm.eps), ref) < TOL[dtype]

    ref_out, ref_res = norm(x, residual)
    res = residual.clone()
    out = rms_norm(x, norm.weight, norm.eps, res)
    assert _same(res, ref_res), "the residual sum must round exactly as the torch add"
    assert _rel(out, ref_out) < TOL[dtype]


def test_rms_norm_reads_strided_rows():
    seed("strided")
    x = torch.randn(8, 256, device=DEVICE)[:, :128]  # row stride 256
    w = torch.randn(128, device=DEVICE)
    ref = RMSNorm(128, 1e-6).to(DEVICE)
    with torch.no_grad():
        ref.weight.copy_(w)
    assert _rel(rms_norm(x, w, 1e-6), ref(x)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 1000] + ([14336] if FULL else []))
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul(tokens, inter, dtype):
    seed(tokens, inter, dtype)
    gate_up = (torch.randn(tokens, 2 * inter, device=DEVICE) * 3).to(dtype)
    gate, up = gate_up.split(inter, dim=-1)
    assert _rel(silu_mul(gate_up), F.silu(gate) * up) < TOL[dtype]


def _reference_rope(qkv, heads, kv_heads, head_dim, cos, sin, q_w, k_w, eps):
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k, v = (t.reshape(-1, n, head_dim) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    if q_w is not None:
        qn, kn = RMSNorm(head_dim, eps, qkv.dtype).to(qkv.device), RMSNorm(head_dim, eps, qkv.dtype).to(qkv.device)
        with torch.no_grad():
            qn.weight.copy_(q_w)
            kn.weight.copy_(k_w)
        q, k = qn(q), kn(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 64), (9, 3, 64)]
                         + ([(32, 8, 128), (16, 8, 128)] if FULL else []))
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_kv_write(tokens, heads, kv_heads, head_dim, qk_norm, dtype):
    seed(tokens, heads, kv_heads, head_dim, qk_norm, dtype)
    block_size, num_blocks = 16, tokens // 16 + 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, 5000, (tokens,), device=DEVICE)
    cos, sin = RotaryEmbedding(head_dim, 500000.0, None).to(DEVICE)(positions)
    q_w = k_w = None
    if qk_norm:
        q_w = (torch.randn(head_dim, device=DEVICE) * 0.3 + 1).to(dtype)
        k_w = (torch.randn(head_dim, device=DEVICE) * 0.3 + 1).to(dtype)
    ref_q, ref_k, ref_v = _reference_rope(qkv, heads, kv_heads, head_dim, cos, sin, q_w, k_w, 1e-6)

    # A strided layer view of a 2-layer cache, slots scattered over it, every third token skipped.
    cache = torch.full((num_blocks, 2, 2, block_size, kv_heads, head_dim), float("nan"), device=DEVICE).to(dtype)
    layer_cache = cache[:, 1]
    slots = torch.randperm((num_blocks - 1) * block_size, device=DEVICE)[:tokens] + block_size
    slots[::3] = -1
    before = cache.clone()
    src = qkv.clone()
    q, k, v = rope_kv_write(src, heads, kv_heads, head_dim, cos, sin, layer_cache, slots, q_w, k_w, 1e-6)

    assert _rel(q, ref_q) < TOL[dtype]
    assert _rel(k, ref_k) < TOL[dtype]
    assert torch.equal(v, ref_v)
    written = slots >= 0
    blk, off = slots[written] // block_size, slots[written] % block_size
    assert _same(layer_cache[blk, 0, off], k[written]), "the cache holds exactly the rotated k"
    assert torch.equal(layer_cache[blk, 1, off], v[written])
    untouched = torch.ones(num_blocks, block_size, dtype=torch.bool, device=DEVICE)
    untouched[blk, off] = False
    assert torch.equal(cache[:, 1].transpose(1, 2)[untouched].isnan(), before[:, 1].transpose(1, 2)[untouched].isnan())
    assert cache[:, 0].isnan().all(), "the other layer is never touched"


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"])
def test_model_with_fused_kernels_equals_torch_expressions(preset, tmp_path):
    """The whole model, fp32: greedy tokens with the fused kernels equal the torch expressions'
    (biases, qk-norm and llama3 RoPE included), prefill chunks and decodes mixed."""
    import random

    from engine import LLM, SamplingParams
    from tests.tiny_models import make_tiny_model_dir

    model_dir = make_tiny_model_dir(preset, tmp_path / preset, seed=1)
    rng = random.Random(preset)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(fused: bool):
        llm = LLM(model=str(model_dir), dtype="float32", device=DEVICE.type, attention_backend="torch",
                  enforce_eager=True, max_num_batched_tokens=48, kv_cache_bytes=64 << 20)
        llm.llm_engine.model.use_fused_kernels(fused)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    assert run(True) == run(False)
