"""Tiny random HF checkpoints built from the named presets, the reference every engine test loads.

The HF transformers model is built from the preset's config dict under a fixed seed and saved with
``save_pretrained``, so our loader reads exactly what a real checkpoint directory holds. Norm
weights and biases are randomised too (HF starts them at 1 and 0, which would hide their bugs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine.models.config import TINY_CONFIGS

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_model_dir(preset: str, path: Path, seed: int = 0, with_tokenizer: bool = False) -> Path:
    """Write a random ``preset`` checkpoint to ``path``; with_tokenizer adds the default model's
    tokenizer (and widens the vocab to its 49152 ids so every token it emits has an embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny preset {preset!r}; known: {', '.join(TINY_CONFIGS)}")
    d = dict(TINY_CONFIGS[preset])
    tokenizer_dir = None
    if with_tokenizer:
        from engine.models.default_model import ensure_default_model

        tokenizer_dir = ensure_default_model()
        d.update(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # HF starts norms at one and biases at zero; random values make a swapped or dropped
        # norm/bias weight show up in the logits.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = Path(path)
    model.save_pretrained(str(path))
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, path / name)
    return path
