"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, params)`` and ``.chat(...)``."""

from __future__ import annotations

from typing import Any, Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """``LLM(model=None)`` serves the bundled SmolLM2-135M-Instruct; any EngineConfig field is a kwarg."""

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self, prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                if isinstance(prompt, dict):
                    prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
                ids.append(engine.add_request(None, prompt, params, stream=False).request_id)
        except Exception:
            engine.abort_request(ids)
            self._drain()
            raise
        final: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        for out in engine.step():  # requests finished outside the last step (aborts)
            final.setdefault(out.request_id, out)
        return [final[i] for i in ids]

    def chat(
        self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        return self.generate([apply_chat_template(tok, conv) for conv in conversations], sampling_params)

    def _drain(self) -> None:
        while self.llm_engine.has_unfinished_requests():
            self.llm_engine.step()
        self.llm_engine.step()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)
