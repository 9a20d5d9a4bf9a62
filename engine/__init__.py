"""The inference engine that prefill and decode services both run.

Owns: model definitions and loading, the paged KV cache (block pool, prefix hashing), the
scheduler (continuous batching, chunked prefill), attention backends, the sampler, the model
runner, incremental detokenization and the offline ``LLM`` API. It imports none of kvfabric's
other packages: a KV connector is handed in and called through its interface.
"""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
