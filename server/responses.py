"""Response bodies as published in /openapi.json (the handlers build plain dicts of these shapes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason
    token_ids: list[int] = Field(description="the answer's token ids (after the cut at EOS, max_tokens "
                                 "and stop strings)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    llada: dict[str, Any] = Field(description="tokenizer, chat_template, vocab_size, mask_token_id, "
                                  "stop_token_ids")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    model: str | None = None


EVENT_STREAM = {"text/event-stream": {"schema": {"type": "string", "description":
                "server-sent events: OpenAI chunks (stream) or diffusion.* events (stream_steps), "
                "ending with 'data: [DONE]'"}}}
