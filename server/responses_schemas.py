"""The Responses API request (POST /v1/responses), its accepted-and-ignored fields and the fields it
refuses by name.

The server is stateless: nothing is stored, so every field that needs a stored response or
conversation (`previous_response_id`, `conversation`, `background`, `prompt`) is refused with a 400
naming it. The diffusion extensions and sampling fields that chat takes (`seed`, `steps`,
`block_length`, `draft_depth`, ...) are declared here with chat's own types and descriptions (copied
from server.schemas, not restated) and reach the chat path unchanged. Unknown fields are ignored
with a warning (or refused under --strict-fields) by server.checks.fields, as on every route.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from server.schemas import ChatCompletionRequest

# Chat fields a Responses request may carry under the same name, handed to the chat request as they are.
PASSTHROUGH = (
    "temperature", "top_p", "seed", "stop", "parallel_tool_calls",
    # diffusion extensions
    "steps", "block_length", "remasking", "cfg_scale", "threshold", "cache", "ban_eos", "defer_eos",
    "eos_bias", "draft_depth", "minimal_topk", "eos_early_stop", "editing_threshold", "max_post_steps",
    "num_to_transfer",
    # vLLM-style extras and structured-output fields
    "ignore_eos", "skip_special_tokens", "top_k", "min_p", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs", "chat_template_kwargs",
    # accepted and ignored on chat too (schemas.IGNORED)
    "user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
)

# The text logprobs are the one `include` value this server can honour.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
STATELESS = "this server is stateless (it stores no responses); send the whole conversation as input"

# field -> (is the value neutral?, why any other value is refused)
NEUTRAL = {
    "previous_response_id": (lambda v: v is None, f"previous_response_id is not supported: {STATELESS}"),
    "conversation": (lambda v: v is None, f"conversation is not supported: {STATELESS}"),
    "background": (lambda v: not v, "background responses are not supported: this server stores no "
                   "responses to poll; send stream: true for incremental output"),
    "background_options": (lambda v: v is None, "background responses are not supported"),
    "prompt": (lambda v: v is None, "prompt (a stored prompt template) is not supported; send instructions "
               "and input"),
    "context_management": (lambda v: not v, "context_management is not supported"),
    "truncation": (lambda v: v in (None, "disabled"), "truncation 'auto' is not supported: an input that does "
                   "not fit the context is refused; send truncation: 'disabled' or leave it out"),
    "max_tool_calls": (lambda v: v is None, "max_tool_calls is not supported; send parallel_tool_calls: false "
                       "for at most one call"),
    "moderation": (lambda v: v is None, "moderation is not available on this server"),
    "image": (lambda v: v is None, "image inputs are not supported"),
    "include": (lambda v: not v or set(v) <= {LOGPROBS_INCLUDE}, f"include: only {LOGPROBS_INCLUDE!r} is "
                "available on this server"),
}

# Accepted and ignored (besides chat's own, schemas.IGNORED): they change nothing this server computes.
IGNORED = ("prompt_cache_retention", "prompt_cache_options", "access_programs", "reasoning", "stream_options",
           "text.verbosity")


def _chat_fields() -> dict:
    fields = ChatCompletionRequest.model_fields
    return {name: (fields[name].annotation, fields[name]) for name in PASSTHROUGH}


_ChatFields = create_model("ResponsesChatFields", __config__=ConfigDict(extra="allow"), **_chat_fields())


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\"}, {\"type\": \"json_object\"} "
                                          "or {\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}, "
                                          "\"strict\": true}")
    verbosity: StrictStr | None = None


class ResponsesStreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_obfuscation: StrictBool | None = None


class ResponsesRequest(_ChatFields):
    """POST /v1/responses: OpenAI's fields (the stateless subset) plus chat's diffusion extensions."""

    model: StrictStr | None = None
    input: Union[StrictStr, list[dict[str, Any]], None] = Field(
        None, description="a string (one user message) or a list of items: messages ({\"role\", \"content\"}), "
        "function_call and function_call_output items")
    instructions: StrictStr | None = Field(None, description="a system message before the input")
    max_output_tokens: StrictInt | None = Field(None, description="answer length cap (tokens)")
    text: ResponsesText | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="function tools: {\"type\": \"function\", "
                                               "\"name\", \"description\", \"parameters\", \"strict\"}")
    tool_choice: Union[StrictStr, dict[str, Any], None] = None
    stream: StrictBool | None = None
    stream_options: ResponsesStreamOptions | None = None
    top_logprobs: StrictInt | None = Field(None, description=f"alternatives per token (0..20; with include "
                                           f"{LOGPROBS_INCLUDE!r})")
    include: list[StrictStr] | None = None
    reasoning: dict[str, Any] | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: dict[str, Any] | None = None
    access_programs: Any | None = None
    # refused unless neutral (NEUTRAL)
    previous_response_id: StrictStr | None = None
    conversation: Union[StrictStr, dict[str, Any], None] = None
    background: StrictBool | None = None
    background_options: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: Any | None = None
    truncation: StrictStr | None = None
    max_tool_calls: StrictInt | None = None
    moderation: Any | None = None
    image: Any | None = None


def refused_field(req: ResponsesRequest) -> tuple[str, str] | None:
    """The first Responses field set to a value this server refuses, with the reason."""
    for name, (ok, why) in NEUTRAL.items():
        if not ok(getattr(req, name)):
            return name, why
    return None
