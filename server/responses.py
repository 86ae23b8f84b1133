"""Response bodies as published in /openapi.json (the handlers build plain dicts of these shapes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]
STOP_REASON = Field(None, description="the stop string or client stop token id (stop_token_ids) that ended "
                    "the answer; null when EOS/EoT or the length ended it")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forwards: int = Field(description="model forwards the answers took (fewer than the sampler's steps "
                          "when draft_depth accepted drafts)")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason
    stop_reason: str | int | None = STOP_REASON
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
    stop_reason: str | int | None = STOP_REASON


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class PairLikelihood(BaseModel):
    index: int
    logprob: float = Field(description="Monte Carlo estimate of log p(continuation | context)")
    stderr: float | None = Field(description="standard error of the estimate (null with one sample)")
    is_greedy: bool = Field(description="one forward over the fully masked continuation predicts it "
                            "exactly (argmax at every position)")
    forwards: int = Field(description="canvases evaluated for this pair (identical samples once; "
                          "twice with cfg_scale)")
    context_tokens: int
    continuation_tokens: int


class LikelihoodUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    forwards: int


class LoglikelihoodResponse(BaseModel):
    object: Literal["loglikelihood"]
    model: str
    mc_samples: int
    seed: int
    cfg_scale: float
    data: list[PairLikelihood]
    usage: LikelihoodUsage


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
