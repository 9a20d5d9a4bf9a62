"""The model layer: our decoder over a paged KV cache gives HF transformers' logits (fp32, CPU) for
every supported family and for the bundled SmolLM2; configs parse both transformers generations;
the loader fails clearly on bad checkpoints; the default model is converted once."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.models import ModelConfig, load_model, resolve_model_path
from engine.models import default_model
from engine.models.config import BENCH_CONFIGS, TINY_CONFIGS
from tests.hf_reference import load_hf_model

PRESETS = list(TINY_CONFIGS)
BLOCK_SIZE = 4


# ---- a minimal paged runner: requests, hand-built metadata, one forward per step ----------------


@dataclass
class Seq:
    block_ids: list[int]  # deliberately out of order: paging must not rely on contiguity
    token_ids: list[int]
    num_computed: int = 0


@dataclass
class PagedModel:
    model: torch.nn.Module
    kv_cache: torch.Tensor
    backend: TorchAttentionBackend = field(default_factory=lambda: TorchAttentionBackend(BLOCK_SIZE))

    @classmethod
    def load(cls, path, num_blocks: int = 32, dtype: torch.dtype = torch.float32) -> PagedModel:
        model, cfg = load_model(path, dtype, "cpu")
        kv = torch.zeros(num_blocks, cfg.num_layers, 2, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        return cls(model, kv)

    def step(self, work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
        """Run ``num_new`` tokens of each sequence (decodes first) -> each one's logits [num_new, V]."""
        meta, input_ids, positions = build_metadata(work)
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(input_ids, positions, self.kv_cache, meta, self.backend))
        for seq, n in work:
            seq.num_computed += n
        return list(logits.split([n for _, n in work]))


def build_metadata(work: list[tuple[Seq, int]]) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    q_lens = [n for _, n in work]
    seq_lens = [s.num_computed + n for s, n in work]
    positions = torch.cat([torch.arange(s.num_computed, s.num_computed + n) for s, n in work])
    input_ids = torch.tensor([t for s, n in work for t in s.token_ids[s.num_computed: s.num_computed + n]])
    width = max(len(s.block_ids) for s, _ in work)
    block_tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s, _ in work], dtype=torch.int32)
    token_req = torch.repeat_interleave(torch.arange(len(work)), torch.tensor(q_lens))
    slot_mapping = block_tables[token_req, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    num_decodes = next((i for i, n in enumerate(q_lens) if n > 1), len(q_lens))
    meta = AttentionMetadata(
        num_tokens=sum(q_lens), num_decodes=num_decodes,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        slot_mapping=slot_mapping, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens, seq_lens_cpu=seq_lens,
    )
    return meta, input_ids, positions


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=torch.tensor([token_ids])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # ~1e-4 relative to the logits' scale: summation order differs (fused qkv, paged attention).
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# ---- logits equal HF transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir):
    """preset -> (our paged model, the HF model), both loaded from one saved checkpoint."""
    cache = {}

    def get(preset):
        if preset not in cache:
            path = tiny_model_dir(preset)
            cache[preset] = (PagedModel.load(path), load_hf_model(path))
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_then_greedy_decode_matches_hf(preset, tiny_pair):
    ours, hf = tiny_pair(preset)
    seq = Seq(block_ids=[5, 2, 7, 3, 6], token_ids=random_prompt(hf.config.vocab_size, 11, seed=1))
    (logits,) = ours.step([(seq, 11)])
    assert_logits_close(logits, hf_logits(hf, seq.token_ids))
    for _ in range(5):  # crosses from block 2 into block 3 of the table
        seq.token_ids.append(int(logits[-1].argmax()))
        (logits,) = ours.step([(seq, 1)])
        assert_logits_close(logits, hf_logits(hf, seq.token_ids)[-1:])


@pytest.mark.parametrize("preset", PRESETS)
def test_two_chunk_prefill_matches_hf(preset, tiny_pair):
    ours, hf = tiny_pair(preset)
    seq = Seq(block_ids=[9, 4, 8, 1], token_ids=random_prompt(hf.config.vocab_size, 13, seed=2))
    ref = hf_logits(hf, seq.token_ids)
    (first,) = ours.step([(seq, 6)])  # the chunk boundary falls mid-block
    (second,) = ours.step([(seq, 7)])
    assert_logits_close(first, ref[:6])
    assert_logits_close(second, ref[6:])


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen3"])
def test_batch_of_decodes_and_prefill_chunks_matches_hf(preset, tiny_pair):
    ours, hf = tiny_pair(preset)
    vocab = hf.config.vocab_size
    a = Seq([10, 11, 12], random_prompt(vocab, 7, seed=3))
    b = Seq([13, 14], random_prompt(vocab, 5, seed=4))
    c = Seq([15, 16, 17, 18], random_prompt(vocab, 14, seed=5))
    ours.step([(a, 7), (b, 5)])
    for s in (a, b):
        s.token_ids.append(3)
    la, lb, lc = ours.step([(a, 1), (b, 1), (c, 8)])
    assert_logits_close(la, hf_logits(hf, a.token_ids)[-1:])
    assert_logits_close(lb, hf_logits(hf, b.token_ids)[-1:])
    assert_logits_close(lc, hf_logits(hf, c.token_ids)[:8])
    a.token_ids.append(4)
    la, lc = ours.step([(a, 1), (c, 6)])
    assert_logits_close(la, hf_logits(hf, a.token_ids)[-1:])
    assert_logits_close(lc, hf_logits(hf, c.token_ids)[8:])


def test_default_model_matches_hf(default_model_dir):
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(default_model_dir))("The capital of France is").input_ids
    ours, hf = PagedModel.load(default_model_dir, num_blocks=8), load_hf_model(default_model_dir)
    seq = Seq(block_ids=[3, 1, 6, 2, 5, 4], token_ids=list(prompt))
    (logits,) = ours.step([(seq, len(prompt))])
    assert_logits_close(logits, hf_logits(hf, seq.token_ids))
    for _ in range(4):
        seq.token_ids.append(int(logits[-1].argmax()))
        (logits,) = ours.step([(seq, 1)])
        assert_logits_close(logits, hf_logits(hf, seq.token_ids)[-1:])


def test_bfloat16_load_tracks_float32(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen2")
    fp32, bf16 = PagedModel.load(path), PagedModel.load(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    prompt = random_prompt(512, 9, seed=6)
    (ref,) = fp32.step([(Seq([1, 2, 3], list(prompt)), 9)])
    (out,) = bf16.step([(Seq([1, 2, 3], list(prompt)), 9)])
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).min() > 0.99


def test_sharded_checkpoint_loads_like_single_file(tiny_model_dir, tmp_path):
    single = tiny_model_dir("tiny-llama")
    hf = load_hf_model(single)
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a, _ = load_model(single)
    b, _ = load_model(tmp_path)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_num_parameters_equals_hf(preset, tiny_pair):
    _, hf = tiny_pair(preset)
    assert ModelConfig.from_hf_config(TINY_CONFIGS[preset]).num_parameters() == sum(p.numel() for p in hf.parameters())


def test_transformers4_and_5_rope_keys_parse_the_same():
    v5 = TINY_CONFIGS["tiny-llama3"]
    rp = dict(v5["rope_parameters"])
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=rp.pop("rope_theta"), rope_scaling=rp)
    a, b = ModelConfig.from_hf_config(v5), ModelConfig.from_hf_config(v4)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling) == (500000.0, b.rope_scaling)
    assert a.rope_scaling.factor == 8.0 and a.rope_scaling.original_max_position_embeddings == 64


def test_family_switches_and_explicit_head_dim():
    qwen2 = ModelConfig.from_hf_config(TINY_CONFIGS["tiny-qwen2"])
    qwen3 = ModelConfig.from_hf_config(TINY_CONFIGS["tiny-qwen3"])
    assert (qwen2.family, qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == ("qwen2", True, False, False)
    assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == ("qwen3", False, True, 32)
    assert qwen3.eos_token_ids == (2, 3)
    llama = ModelConfig.from_hf_config(BENCH_CONFIGS["llama-3.1-8b"])
    assert abs(llama.num_parameters() - 8.03e9) < 0.01e9


def test_model_type_is_used_when_architectures_is_absent():
    d = {k: v for k, v in TINY_CONFIGS["tiny-mistral"].items() if k != "architectures"}
    assert ModelConfig.from_hf_config(d).family == "mistral"


def test_mistral_sliding_window_caps_the_context():
    d = {**TINY_CONFIGS["tiny-mistral"], "sliding_window": 128}
    assert ModelConfig.from_hf_config(d).max_position_embeddings == 128


def test_unsupported_architecture_is_named():
    d = {**TINY_CONFIGS["tiny-llama"], "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_hf_config(d)


def test_unsupported_rope_type_is_named():
    d = {**TINY_CONFIGS["tiny-llama"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        ModelConfig.from_hf_config(d)


# ---- loader errors -------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_copy(tiny_model_dir, tmp_path):
    src = tiny_model_dir("tiny-llama")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nope"):
        load_model(tmp_path / "nope")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(checkpoint_copy)


def test_no_weight_files(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weight files"):
        load_model(checkpoint_copy)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weight_file(checkpoint_copy, damage):
    f = checkpoint_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00garbage" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weight file .*model.safetensors"):
        load_model(checkpoint_copy)


def test_missing_tensor_is_named(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model.layers.1.self_attn.k_proj.weight"):
        load_model(checkpoint_copy)


def test_shape_mismatch_is_named(checkpoint_copy):
    cfg_file = checkpoint_copy / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.\w+_proj.weight .* has shape"):
        load_model(checkpoint_copy)


def test_unsupported_architecture_in_checkpoint(checkpoint_copy):
    cfg_file = checkpoint_copy / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architectures": ["PhiForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture PhiForCausalLM"):
        load_model(checkpoint_copy)


def test_model_id_tells_random_inits_apart(tiny_model_dir):
    a = ModelConfig.from_pretrained_dir(tiny_model_dir("tiny-llama", seed=0))
    b = ModelConfig.from_pretrained_dir(tiny_model_dir("tiny-llama", seed=1))
    assert a.model_id != b.model_id
    assert a.model_id == ModelConfig.from_pretrained_dir(tiny_model_dir("tiny-llama", seed=0)).model_id


# ---- model resolution and the default model ------------------------------------------------------


def test_unknown_model_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_preset_gets_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFABRIC_CACHE_DIR", str(tmp_path))
    path = resolve_model_path("preset:tiny-qwen3")
    model, cfg = load_model(path)
    assert path.parent == tmp_path / "presets" and cfg.family == "qwen3"
    assert model.layers[0].self_attn.qkv_proj.weight.std() > 0.1  # the preset's initializer_range
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_model_path("preset:gpt-5")


def test_default_model_dir_is_complete(default_model_dir):
    from transformers import AutoTokenizer

    assert resolve_model_path("default") == resolve_model_path("SmolLM2-135M-Instruct") == default_model_dir
    cfg = ModelConfig.from_pretrained_dir(default_model_dir)
    assert (cfg.family, cfg.num_layers, cfg.vocab_size, cfg.eos_token_ids) == ("llama", 30, 49152, (2,))
    assert "quantization_config" not in json.loads((default_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_concurrent_starts_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFABRIC_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough that the second caller arrives mid-conversion
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "_convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path(None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert len(calls) == 1 and results == [target, target]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".SmolLM2-135M-Instruct.lock",
                                                                       "SmolLM2-135M-Instruct"]
