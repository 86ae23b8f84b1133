"""OpenAI request models (with the diffusion extension fields) and the fields we refuse.

Unknown fields are refused (400) rather than ignored, so that nothing a client sends is silently
misread. OpenAI fields that have no meaning for this server are accepted only at their neutral value
(null, or the value that changes nothing) and otherwise refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class DiffusionFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's plus the diffusion extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None

    # Diffusion extensions (the openai client sends them with extra_body).
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    cfg_scale: float | None = None
    threshold: float | None = None
    cache: str | None = None
    ban_eos: bool = False
    defer_eos: bool = False
    stream_steps: bool = False   # the per-step unmasking stream instead of OpenAI chunks

    # OpenAI fields accepted only at a neutral value (see NEUTRAL).
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class CompletionRequest(DiffusionFields):
    prompt: Union[str, list[str], list[int], list[list[int]], None] = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    parallel_tool_calls: bool | None = None


# field -> (is the value neutral?, why a non-neutral value is refused)
NEUTRAL = {
    "top_p": (lambda v: v is None or v == 1, "top_p is not supported (diffusion sampling draws from "
              "the full distribution); send 1 or leave it out"),
    "top_k": (lambda v: v is None or v == 0, "top_k is not supported; leave it out"),
    "presence_penalty": (lambda v: v is None or v == 0, "presence_penalty is not supported by "
                         "masked-diffusion sampling (all tokens are decoded in parallel); send 0 or leave it out"),
    "frequency_penalty": (lambda v: v is None or v == 0, "frequency_penalty is not supported by "
                          "masked-diffusion sampling; send 0 or leave it out"),
    "repetition_penalty": (lambda v: v is None or v == 1, "repetition_penalty is not supported; leave it out"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported; use ban_eos to forbid EOS"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported (there is no sequence "
                "likelihood to rank by); use n"),
    "logprobs": (lambda v: v is None or v is False or v == 0, "logprobs are not supported"),
    "top_logprobs": (lambda v: v is None or v == 0, "top_logprobs are not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: v is None, "suffix (infilling) is not supported"),
    "response_format": (lambda v: v is None or v.get("type") == "text",
                        "response_format other than {\"type\": \"text\"} is not supported"),
    "tools": (lambda v: not v, "tools are not supported"),
    "tool_choice": (lambda v: v is None or v == "none", "tool_choice is not supported"),
    "functions": (lambda v: not v, "functions are not supported"),
    "function_call": (lambda v: v is None or v == "none", "function_call is not supported"),
    "parallel_tool_calls": (lambda v: True, ""),
}


def refused_field(req: BaseModel) -> tuple[str, str] | None:
    """The first field set to a value this server refuses, with the reason."""
    for name, (ok, why) in NEUTRAL.items():
        if name in type(req).model_fields and not ok(getattr(req, name)):
            return name, why
    return None
