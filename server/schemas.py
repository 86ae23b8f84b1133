"""OpenAI request models (with the diffusion extension fields) and the fields we refuse.

Types are strict where OpenAI's are: an integer field takes a JSON integer, a boolean field a JSON
boolean ("max_tokens": "8" or "stream": "no" is a 400 naming the field, never a silent coercion).
An explicit null means the field is absent. Unknown fields are refused (400) rather than ignored, so
that nothing a client sends is silently misread. OpenAI fields that have no meaning for this server
are accepted only at their neutral value (null, or the value that changes nothing) and otherwise
refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


class DiffusionFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's plus the diffusion extensions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, description="answer length cap (tokens); default: what is "
                                         "left of the context, up to the server's default")
    temperature: StrictFloat | None = None
    n: StrictInt | None = Field(None, description="choices per prompt (default 1)")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    user: StrictStr | None = None

    # Diffusion extensions (the openai client sends them with extra_body).
    steps: StrictInt | None = Field(None, description="denoising steps over the whole answer "
                                    "(default: one token per step)")
    block_length: StrictInt | None = Field(None, description="semi-autoregressive block length")
    remasking: StrictStr | None = Field(None, description="low_confidence (default) or random")
    cfg_scale: StrictFloat | None = Field(None, description="classifier-free guidance scale (0: off)")
    threshold: StrictFloat | None = Field(None, description="confidence-threshold parallel decoding, (0, 1]")
    cache: StrictStr | None = Field(None, description="none (default), prefix or dual")
    ban_eos: StrictBool | None = None
    defer_eos: StrictBool | None = None
    stream_steps: StrictBool | None = Field(None, description="the per-step unmasking stream instead of "
                                            "OpenAI chunks")

    # Sampling filters (for sampled requests: temperature > 0; greedy requests ignore them).
    top_p: StrictFloat | StrictInt | None = Field(None, description="nucleus filter, (0, 1]; 1: off")
    top_k: StrictInt | None = Field(None, description="keep the k most likely tokens; 0 or -1: off")
    min_p: StrictFloat | StrictInt | None = Field(None, description="keep tokens with probability >= min_p "
                                                  "x the most likely one's, [0, 1]; 0: off")

    # OpenAI fields accepted only at a neutral value (see NEUTRAL).
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None


class CompletionRequest(DiffusionFields):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]], None] = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = Field(None, description="per answer token its log-probability in the step "
                                       "that committed it and this many alternatives (0..20)")
    suffix: StrictStr | None = Field(None, description="text after the answer (fill-in-the-middle)")
    infill: StrictBool | None = Field(None, description="fill the positions the prompt marks with "
                                      "<|mdm_mask|> (or the mask id), one token each")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = Field(None, description="commit-time log-probabilities of the answer tokens")
    top_logprobs: StrictInt | None = Field(None, description="alternatives per token (0..20; needs logprobs)")
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    parallel_tool_calls: StrictBool | None = None


class ScoringPair(BaseModel):
    """One (context, continuation) pair, each as text or as token ids."""

    model_config = ConfigDict(extra="forbid")
    context: Union[StrictStr, list[StrictInt]] = Field(description="conditioning text or ids (may be empty)")
    continuation: Union[StrictStr, list[StrictInt]] = Field(description="the text or ids to score")


class LoglikelihoodRequest(BaseModel):
    """POST /v1/loglikelihood: Monte Carlo log p(continuation | context) per pair."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    pairs: list[ScoringPair] = Field(description="the pairs to score")
    mc_samples: StrictInt | None = Field(None, description="Monte Carlo samples per pair (default 32; "
                                         "the LLaDA paper uses 128)")
    cfg_scale: Union[StrictFloat, StrictInt, None] = Field(None, description="classifier-free guidance "
                                                           "scale (0: off)")
    seed: StrictInt | None = Field(None, description="seeds the masks drawn (default 0: reproducible)")


ECHO_REFUSAL = ("echo (prompt log-probabilities) is not supported: a masked-diffusion model has no "
                "left-to-right token probabilities. Score continuations with POST /v1/loglikelihood "
                "(Monte Carlo log p(continuation | context)), or run lm-eval through the adapter "
                "`python -m evaluation.lm_eval_adapter`")

# field -> (is the value neutral?, why a non-neutral value is refused)
NEUTRAL = {
    "echo": (lambda v: not v, ECHO_REFUSAL),  # first: lm-eval's likelihood route sends echo + logprobs
    "presence_penalty": (lambda v: v is None or v == 0, "presence_penalty is not supported by "
                         "masked-diffusion sampling (all tokens are decoded in parallel); send 0 or leave it out"),
    "frequency_penalty": (lambda v: v is None or v == 0, "frequency_penalty is not supported by "
                          "masked-diffusion sampling; send 0 or leave it out"),
    "repetition_penalty": (lambda v: v is None or v == 1, "repetition_penalty is not supported; leave it out"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported; use ban_eos to forbid EOS"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported (there is no sequence "
                "likelihood to rank by); use n"),
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
