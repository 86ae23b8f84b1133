"""vLLM's utility routes: `POST /tokenize`, `POST /detokenize` and `GET /version`, in vLLM's request
and response shapes.

`/tokenize` returns exactly the ids the generation endpoints run for the same `prompt` (completions)
or `messages` (chat: the checkpoint's chat template, `add_generation_prompt`,
`continue_final_message`, `chat_template_kwargs`), checked by the same rules (server/checks.py:
empty, context, model name, unknown fields). This server never adds the tokenizer's own special
tokens to a prompt (a chat template writes its own), so `add_special_tokens: true` is refused by
name (server.schemas.VLLM_REFUSED, as on chat). /tokenize and /detokenize need the API key (when the
server has one) and are guarded like /v1/ bodies (server.guards.BODY_PATHS); /version, like /health,
does not. `/detokenize` decodes ids (special tokens kept, so that tokenize -> detokenize round-trips),
each checked against the vocabulary.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server import checks
from server.errors import API_ERRORS, ApiError
from server.metrics import _version
from server.requests import chat_prompt, completion_prompts
from server.routes import SizeCheckedRoute, require_api_key, take_request_id
from server.schemas import ChatMessage


class TokenizeRequest(BaseModel):
    """A prompt (completions) or messages (chat), as vLLM's /tokenize takes them."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    prompt: StrictStr | None = Field(None, description="text, tokenized as /v1/completions does")
    messages: list[ChatMessage] | None = Field(None, description="chat messages, rendered as "
                                               "/v1/chat/completions does")
    add_generation_prompt: StrictBool | None = Field(None, description="chat: open the assistant's turn "
                                                     "(default true)")
    continue_final_message: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: StrictBool | None = Field(None, description="only false: this server adds no "
                                                  "tokenizer special tokens to a prompt")
    return_token_strs: StrictBool | None = Field(None, description="also each token's string")
    request_id: StrictStr | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    tokens: list[StrictInt] = Field(description="token ids to decode")
    request_id: StrictStr | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


vllm = APIRouter(tags=["vLLM API"], dependencies=[Depends(require_api_key)], route_class=SizeCheckedRoute,
                 responses=API_ERRORS)
vllm_open = APIRouter(tags=["vLLM API"])  # /version: no API key, like /health


def _tokenize(svc, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send either prompt or messages", param="prompt" if body.prompt is None else "messages",
                       code="invalid_value")
    if body.messages is not None:
        return chat_prompt(svc, body)
    return completion_prompts(svc, [body.prompt])[0]


@vllm.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
async def tokenize(request: Request, body: TokenizeRequest):
    svc = request.app.state.service
    take_request_id(request, body)
    checks.fields(svc, body)
    checks.need_tokenizer(svc, "tokenize")
    ids = await asyncio.to_thread(_tokenize, svc, body)
    out = {"count": len(ids), "max_model_len": svc.config.max_sequence_length, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [svc.tokenizer.id_to_token(t) for t in ids]
    return out


@vllm.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(request: Request, body: DetokenizeRequest):
    svc = request.app.state.service
    take_request_id(request, body)
    checks.fields(svc, body)
    tok = checks.need_tokenizer(svc, "detokenize")
    checks.fits_context(svc, "tokens", tokens=len(body.tokens))
    ids = checks.in_vocabulary(svc, body.tokens, "tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, ids, False)}


@vllm_open.get("/version", response_model=VersionResponse)
async def version():
    return {"version": _version()}
