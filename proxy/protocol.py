"""The OpenAI requests the proxy accepts, as pydantic models.

Options nobody implements are refused with a 400 naming them, never silently ignored:
any unknown key (``extra="forbid"``); ``best_of`` other than ``n`` (no ranking of candidates);
``echo`` together with ``logprobs`` (the engines report no prompt logprobs), ``suffix``;
non-empty ``logit_bias``; ``tools``, ``tool_choice`` other than "none", ``functions``,
``function_call``; a ``response_format`` other than text; non-text content parts (images, audio);
``stream_options`` without ``stream``. ``n`` > 1 runs n sequences (a seeded request's i-th with
seed + i, as vLLM does); ``echo`` prepends the prompt; ``user`` names a session for routing
affinity (proxy/router.py).
Beyond OpenAI, vLLM's sampling extras are accepted: ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``include_stop_str_in_output``,
``skip_special_tokens``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from protos import kvfabric_pb2 as pb
from proxy.errors import bad_request

MAX_LOGPROBS = 20
MAX_N = 16
_INT32_MAX = 2**31 - 1  # the SamplingParams proto's int32 fields: a larger value is a 400, not a 500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(le=_INT32_MAX)]] | None = None
    min_tokens: int = Field(0, ge=0, le=_INT32_MAX)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be set when stream is true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop strings must be non-empty", param="stop")
        if any(t < 0 for t in self.stop_token_ids or []):
            raise bad_request("stop_token_ids must be non-negative", param="stop_token_ids")

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int = 0) -> pb.SamplingParams:
        """The engine's parameters for sequence ``index`` of the n (a seeded one gets seed + index)."""
        p = pb.SamplingParams(
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
            stop_token_ids=self.stop_token_ids or [], include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
        )
        for name in ("temperature", "top_p", "seed", "repetition_penalty"):
            if getattr(self, name) is not None:
                setattr(p, name, getattr(self, name))
        if self.seed is not None:
            p.seed = (self.seed + index + 2**63) % 2**64 - 2**63
        if logprobs is not None:
            p.logprobs = logprobs
        return p

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, self.n):
            raise bad_request("best_of must equal n (candidates are not ranked)", param="best_of",
                              code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", param="echo",
                              code="unsupported_parameter")
        if self.suffix is not None:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_parameter")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)) \
                and len(self.prompt) != 1:
            raise bad_request("only one prompt per request is supported", param="prompt")
        if self.prompt in ("", [], [""], [[]]):
            raise bad_request("the prompt is empty", param="prompt")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content[{j}]: content part type {part.get('type')!r} is not "
                                  "supported (text only)",
                                  param=f"messages.{index}.content.{j}", code="unsupported_parameter")
            parts.append(part["text"])
        return "\n".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions", "function_call"):
            if getattr(self, name):
                raise bad_request(f"{name} (tool calling) is not supported", param=name,
                                  code="unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported", param="tool_choice", code="unsupported_parameter")
        if self.response_format and self.response_format.get("type") != "text":
            raise bad_request("only response_format type 'text' is supported", param="response_format",
                              code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            msg = {"role": m.role, "content": m.text(i)}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a ``prompt`` (TokenizeCompletionRequest) or ``messages`` (TokenizeChatRequest)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def model_post_init(self, _context) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise bad_request("messages is empty", param="messages")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.prompt is not None

    def as_chat(self) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=self.messages, add_generation_prompt=self.add_generation_prompt,
                                     chat_template_kwargs=self.chat_template_kwargs)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
