"""OpenAI request models (with the diffusion extension fields), the fields accepted and ignored, and
the values refused.

Types are strict where OpenAI's are: an integer field takes a JSON integer, a boolean field a JSON
boolean ("max_tokens": "8" or "stream": "no" is a 400 naming the field, never a silent coercion).
An explicit null means the field is absent. Fields that do not change what this server computes
(`IGNORED`) are accepted and ignored. A field set to a behaviour we cannot honour is refused with a
400 naming it (`NEUTRAL`: the values that change nothing are accepted). Fields nobody declared are
ignored with a warning naming them (`unknown_fields`), or refused when the server runs with
--strict-fields.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = Field(None, description="usage (so far) on every chunk")


class DiffusionFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's plus the diffusion extensions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, description="answer length cap (tokens); default: what is "
                                         "left of the context, up to the server's default")
    temperature: StrictFloat | None = None
    n: StrictInt | None = Field(None, description="choices per prompt (default 1)")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None

    # Diffusion extensions (the openai client sends them with extra_body).
    steps: StrictInt | None = Field(None, description="denoising steps over the whole answer "
                                    "(default: one token per step); LLaDA2: steps per block (default 32)")
    block_length: StrictInt | None = Field(None, description="semi-autoregressive block length")
    remasking: StrictStr | None = Field(None, description="low_confidence (default) or random")
    cfg_scale: StrictFloat | None = Field(None, description="classifier-free guidance scale (0: off)")
    threshold: StrictFloat | None = Field(None, description="confidence-threshold parallel decoding, (0, 1]; "
                                          "LLaDA2: unmask every position above it, [0, 1] (default 0.95)")
    cache: StrictStr | None = Field(None, description="none (default), prefix or dual")
    ban_eos: StrictBool | None = None
    defer_eos: StrictBool | None = None
    eos_bias: StrictFloat | StrictInt | None = Field(None, description="added to the EOS logit, [-100, 100]; "
                                                     "negative: EOS less likely, without a ban (0: off)")
    stream_steps: StrictBool | None = Field(None, description="the per-step unmasking stream instead of "
                                            "OpenAI chunks")
    draft_depth: StrictInt | None = Field(None, description="exact parallel decoding: guessed next steps "
                                          "verified per forward, 0 (off) to 8; the same ids, fewer forwards "
                                          "(default: the server's --draft-depth)")
    # Block diffusion (LLaDA2.x checkpoints only; defaults: the checkpoint's released generate).
    minimal_topk: StrictInt | None = Field(None, description="LLaDA2: caps steps per block at "
                                           "max_tokens // minimal_topk (default 1)")
    eos_early_stop: StrictBool | None = Field(None, description="LLaDA2: stop as soon as an EOS is "
                                              "decoded with nothing masked before it (default false)")
    editing_threshold: StrictFloat | None = Field(None, description="LLaDA2.1 token editing: a decoded "
                                                  "token is replaced when the model's choice there has "
                                                  "probability above this, [0, 1]")
    max_post_steps: StrictInt | None = Field(None, description="LLaDA2.1: editing forwards per block "
                                             "after its last mask (default 16)")
    num_to_transfer: StrictInt | None = Field(None, description="LLaDA2.1: tokens unmasked per step when "
                                              "too few pass threshold (default 1)")

    # Structured output (server.constraints): the answer is valid by construction.
    response_format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\"}, "
                                                   "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                                                   "\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    guided_json: Union[dict[str, Any], StrictStr, None] = Field(None, description="a JSON schema the answer "
                                                                "follows (object or JSON text)")
    guided_regex: StrictStr | None = Field(None, description="a regular expression the answer matches")
    guided_choice: list[StrictStr] | None = Field(None, description="the answer is one of these strings")
    guided_grammar: StrictStr | None = Field(None, description="a grammar (Lark or GBNF) the answer follows")
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's form: one of json, regex, "
                                                      "choice, grammar, json_object")

    # vLLM-style extras.
    ignore_eos: StrictBool | None = Field(None, description="no EOS/EoT ends the answer: exactly max_tokens "
                                          "tokens (LLaDA2.x: same as ban_eos)")
    stop_token_ids: list[StrictInt] | None = Field(None, description="token ids that end the answer like EOS")
    min_tokens: StrictInt | None = Field(None, description="no stop id or stop string ends the answer before "
                                         "this many tokens (0..max_tokens)")
    include_stop_str_in_output: StrictBool | None = Field(None, description="keep the stop string (or stop "
                                                          "token) that ended the answer")
    request_id: StrictStr | None = Field(None, description="echoed as the x-request-id response header "
                                         "(default: the x-request-id request header, or a generated id)")
    priority: StrictInt | None = Field(None, description="admission order: lower is sooner (default 0)")
    return_tokens_as_token_ids: StrictBool | None = Field(None, description="logprobs name tokens as "
                                                          "'token_id:N'")
    # vLLM fields this server knows and does not honour (see VLLM_REFUSED: a 400 unless neutral).
    prompt_logprobs: Any | None = None
    use_beam_search: StrictBool | None = None
    length_penalty: StrictFloat | StrictInt | None = None
    allowed_token_ids: list[Any] | None = None
    bad_words: list[Any] | None = None
    truncate_prompt_tokens: Any | None = None
    logits_processors: list[Any] | None = None
    skip_special_tokens: StrictBool | None = Field(None, description="default true; false keeps special "
                                                   "tokens (EOS/EoT included) in the text")

    # Sampling filters (for sampled requests: temperature > 0; greedy requests ignore them).
    top_p: StrictFloat | StrictInt | None = Field(None, description="nucleus filter, (0, 1]; 1: off")
    top_k: StrictInt | None = Field(None, description="keep the k most likely tokens; 0 or -1: off")
    min_p: StrictFloat | StrictInt | None = Field(None, description="keep tokens with probability >= min_p "
                                                  "x the most likely one's, [0, 1]; 0: off")

    # OpenAI fields accepted only at a neutral value (see NEUTRAL).
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: StrictInt | None = None

    # Accepted and ignored: they do not change what this server computes (see IGNORED).
    user: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None


class CompletionRequest(DiffusionFields):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]], None] = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = Field(None, description="per answer token its log-probability in the step "
                                       "that committed it and this many alternatives (0..20)")
    suffix: StrictStr | None = Field(None, description="text after the answer (fill-in-the-middle)")
    infill: StrictBool | None = Field(None, description="fill the positions the prompt marks with "
                                      "<|mdm_mask|> (or the mask id), one token each")
    prompt_embeds: Any | None = None  # vLLM's; refused (VLLM_REFUSED)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    """A message as clients send it, including an SDK's own assistant message dumped back."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None
    # Set (to null) on the SDK's assistant message objects; a real value asks for what we lack.
    refusal: StrictStr | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[Any] | None = None  # an assistant's calls (server.tools)
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = Field(None, description="commit-time log-probabilities of the answer tokens")
    top_logprobs: StrictInt | None = Field(None, description="alternatives per token (0..20; needs logprobs)")
    tools: list[Any] | None = Field(None, description="function tools (server.tools)")
    tool_choice: Any | None = Field(None, description="none, auto (default with tools), required or "
                                    "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    functions: list[Any] | None = None
    function_call: Any | None = None
    parallel_tool_calls: StrictBool | None = Field(None, description="default true: one or more calls")
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    # vLLM-style chat extras.
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template")
    add_generation_prompt: StrictBool | None = Field(None, description="default true: open the assistant's turn")
    continue_final_message: StrictBool | None = Field(
        None, description="continue the final (assistant) message instead of starting a new turn")
    # vLLM chat fields this server knows and does not honour (VLLM_REFUSED).
    chat_template: StrictStr | None = None
    documents: list[Any] | None = None
    add_special_tokens: StrictBool | None = None


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

# Accepted and ignored (documented in the README): they change nothing this server computes.
IGNORED = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
           "prediction", "reasoning_effort", "verbosity")

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
    "functions": (lambda v: not v, "functions (the deprecated form) are not supported; send tools"),
    "function_call": (lambda v: v is None or v == "none", "function_call (the deprecated form) is not "
                      "supported; send tool_choice"),
    "modalities": (lambda v: v is None or set(v) <= {"text"}, "only the text modality is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not available on this server"),
}

# message field -> (is the value neutral?, why not)
MESSAGE_NEUTRAL = {
    "function_call": (lambda v: v is None, "function calls are not supported"),
    "audio": (lambda v: v is None, "audio messages are not supported"),
}


# vLLM fields known and not honoured: field -> (is the value neutral?, why not)
VLLM_REFUSED = {
    "prompt_logprobs": (lambda v: v is None, "prompt_logprobs is not supported: a masked-diffusion model has "
                        "no left-to-right prompt probabilities; score text with POST /v1/loglikelihood"),
    "use_beam_search": (lambda v: not v, "beam search is not supported by masked-diffusion sampling"),
    "length_penalty": (lambda v: v is None or v == 1, "length_penalty applies to beam search, which is not "
                       "supported; leave it out"),
    "allowed_token_ids": (lambda v: v is None, "allowed_token_ids is not supported; use guided_choice, "
                          "guided_regex or a grammar"),
    "bad_words": (lambda v: not v, "bad_words is not supported"),
    "truncate_prompt_tokens": (lambda v: v is None, "truncate_prompt_tokens is not supported: a prompt longer "
                               "than the context is refused"),
    "logits_processors": (lambda v: not v, "logits_processors are not supported"),
    "chat_template": (lambda v: v is None, "chat_template: a client's template is not run; this server renders "
                      "the checkpoint's own (use chat_template_kwargs for its variables)"),
    "documents": (lambda v: not v, "documents are not supported; put the text in the messages"),
    "add_special_tokens": (lambda v: not v, "add_special_tokens: this server adds no tokenizer special tokens "
                           "to a prompt (a chat template writes its own); leave it out or send false"),
    "prompt_embeds": (lambda v: v is None, "prompt_embeds are not supported; send text or token ids"),
}
NEUTRAL.update(VLLM_REFUSED)


def _messages(req: BaseModel) -> list:
    """The parsed chat messages of a request whose model declares them (in a completion body a
    `messages` key is an unknown field holding raw JSON, not messages)."""
    return (req.messages or []) if "messages" in type(req).model_fields else []


def refused_field(req: BaseModel) -> tuple[str, str] | None:
    """The first field set to a value this server refuses, with the reason."""
    for name, (ok, why) in NEUTRAL.items():
        if name in type(req).model_fields and not ok(getattr(req, name)):
            return name, why
    for i, m in enumerate(_messages(req)):
        for name, (ok, why) in MESSAGE_NEUTRAL.items():
            if not ok(getattr(m, name)):
                return f"messages.{i}.{name}", why
    return None


def unknown_fields(req: BaseModel) -> list[str]:
    """Fields no model declares, by path (`frobnicate`, `messages.0.foo`, `stream_options.bar`)."""
    out = list(req.model_extra or ())
    if getattr(req, "stream_options", None) is not None:
        out += [f"stream_options.{k}" for k in req.stream_options.model_extra or ()]
    for i, m in enumerate(_messages(req)):
        out += [f"messages.{i}.{k}" for k in m.model_extra or ()]
    return out
