"""POST /v1/responses: OpenAI's Responses API, stateless, on top of the chat path.

A Responses request becomes a chat request (`chat_request`: instructions and input items ->
messages, `text.format` -> `response_format`, function tools and `tool_choice` -> chat's shapes,
`max_output_tokens` -> `max_completion_tokens`, the diffusion extensions as they are), which the chat
route runs unchanged: every request rule is chat's (server.checks), and the answer, its ids and its
usage are exactly the chat answer's. The chat answer then becomes a Response object
(`ResponseBuilder`): a message item with the text and one function_call item per tool call. A
streamed request reads chat's own chunks and emits the Responses event sequence (`response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`..., the matching `.done` events, then `response.completed` or, cut by
`max_output_tokens`, `response.incomplete`; an engine failure mid-stream is an `error` event and
`response.failed`).

Errors name the Responses field: chat's `max_tokens` is reported as `max_output_tokens`,
`response_format` as `text.format`, `messages` as `input`.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from server import checks
from server.errors import API_ERRORS, ApiError, clip, validation_error
from server.responses import EVENT_STREAM
from server.responses_schemas import LOGPROBS_INCLUDE, PASSTHROUGH, STATELESS, ResponsesRequest, refused_field
from server.routes import SizeCheckedRoute, chat_completions, require_api_key
from server.schemas import ChatCompletionRequest

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
# chat's field -> the Responses field it came from (error params and messages)
RENAMED = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "response_format": "text.format", "messages": "input", "prompt": "input"}


_bad = ApiError.bad_field  # a 400 naming the field


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------- request: Responses -> chat
def _content(content, where: str):
    """A message's content for chat: a string, or chat's text parts (other part types go to chat as
    they are, which refuses them by type)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _bad(f"{where}.content", f"{where}.content must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _bad(f"{where}.content.{j}", "a content part must be an object")
        kind = part.get("type")
        if kind in TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content.{j}.text", f"{where}.content.{j}.text must be a string")
            parts.append({"type": "text", "text": part["text"]})
        else:
            parts.append({"type": str(kind)})
    return parts


def _text(content, where: str) -> str:
    """A function_call_output's output as one string."""
    parts = _content(content, where)
    if isinstance(parts, str):
        return parts
    for j, p in enumerate(parts):
        if p["type"] != "text":
            raise _bad(f"{where}.content.{j}.type", f"tool output parts of type {clip(p['type'])} are not "
                       "supported (text only)", "unsupported_content")
    return "".join(p["text"] for p in parts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"{where}.{key}", f"{where}.{key} must be a string")
    return value


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {clip(role)}")
    return {"role": role, "content": _content(item.get("content"), where)}


def _add_call(msgs: list[dict], item: dict, where: str) -> None:
    """A function_call item: a tool call of the assistant message before it (or of a new one)."""
    call = {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
    if msgs and msgs[-1]["role"] == "assistant":
        msgs[-1].setdefault("tool_calls", []).append(call)
    else:
        msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})


def chat_messages(instructions: str | None, items) -> list[dict]:
    """Chat messages of `instructions` (a system message first) and `input` (a string: one user
    message; or a list of message, function_call and function_call_output items)."""
    msgs = [{"role": "system", "content": instructions}] if instructions else []
    if not items:
        raise _bad("input", "input is empty", "empty_prompt")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    for i, item in enumerate(items):
        where, kind = f"input.{i}", item.get("type", "message")
        if kind == "message":
            msgs.append(_message(item, where))
        elif kind == "function_call":
            _add_call(msgs, item, where)
        elif kind == "function_call_output":
            msgs.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                         "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise _bad(f"{where}.type", f"input items of type {clip(kind)} are not supported: this server takes "
                       "message, function_call and function_call_output items", "unsupported_value")
    return msgs


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Function tools in chat's shape; any other tool type is refused by name."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise _bad(f"tools.{i}.type", f"tools of type {clip(kind)} are not supported: this server runs "
                       "function tools only", "unsupported_tool")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(f"tools.{i}.name", f"tools.{i}: a function tool needs a name")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _function_ref(tool, where: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        raise _bad(where, f"{where} must be {{\"type\": \"function\", \"name\": ...}}")
    return {"type": "function", "function": {"name": tool["name"]}}


def chat_tool_choice(choice):
    """`tool_choice` in chat's shape: none, auto, required, a named function, or allowed_tools."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        return _function_ref(choice, "tool_choice")
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        tools = [_function_ref(t, f"tool_choice.tools.{i}") for i, t in enumerate(choice["tools"])]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": tools}}
    raise _bad("tool_choice", "tool_choice must be none, auto, required, {\"type\": \"function\", \"name\": ...} "
               f"or allowed_tools (function tools only), got {clip(choice)}")


def chat_response_format(fmt: dict | None) -> dict | None:
    """`text.format` as chat's `response_format`."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise _bad("text.format.type", "text.format type must be text, json_object or json_schema, "
                   f"got {clip(kind)}")
    if not isinstance(fmt.get("schema"), dict):
        raise _bad("text.format.schema", "text.format json_schema needs a schema (a JSON Schema object)")
    spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


def chat_request(req: ResponsesRequest) -> dict:
    """The chat request body that computes this Responses request's answer."""
    body = {name: getattr(req, name) for name in PASSTHROUGH}
    body.update(model=req.model, messages=chat_messages(req.instructions, req.input),
                max_completion_tokens=req.max_output_tokens, stream=bool(req.stream),
                response_format=chat_response_format(req.text.format if req.text else None),
                tools=chat_tools(req.tools), tool_choice=chat_tool_choice(req.tool_choice))
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if LOGPROBS_INCLUDE in (req.include or ()) or req.top_logprobs:
        body.update(logprobs=True, top_logprobs=req.top_logprobs)
    return {k: v for k, v in body.items() if v is not None}


def renamed(err: ApiError) -> ApiError:
    """A chat-path error with the Responses field's name for chat's."""
    head, dot, rest = (err.param or "").partition(".")
    if head in RENAMED:
        err.param = RENAMED[head] + (dot + rest if RENAMED[head] != "input" else "")
        if head.startswith("max_"):
            err.message = re.sub(rf"\b{head}\b", "max_output_tokens", err.message)
    return err


# ---------------------------------------------------------------- answer: chat -> Response object
def _usage(u: dict) -> dict:
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"], "forwards": u.get("forwards")}


def _error_code(status: int) -> str:
    return {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(status, "server_error")


class ResponseBuilder:
    """The Response object of one request, built from the chat answer: whole (`from_chat`) or chunk
    by chunk (`ResponseStream`). Output items keep the order in which they opened."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req, self.model = req, model
        self.id, self.created = _new_id("resp_"), int(time.time())
        self.items: list[dict] = []
        self.message: dict | None = None   # the message item text goes to
        self.calls: dict[int, dict] = {}   # chat's tool-call index -> its function_call item
        self.finish_reason = self.usage = self.error = None

    def open_message(self) -> dict:
        self.message = {"type": "message", "id": _new_id("msg_"), "status": "in_progress", "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.items.append(self.message)
        return self.message

    def open_call(self, index: int, call_id: str, name: str) -> dict:
        self.message = None  # text after a call opens a new message
        item = {"type": "function_call", "id": _new_id("fc_"), "call_id": call_id, "name": name,
                "arguments": "", "status": "in_progress"}
        self.calls[index] = item
        self.items.append(item)
        return item

    def close(self, item: dict) -> None:
        cut = self.finish_reason == "length"
        item["status"] = "incomplete" if cut and item["type"] == "message" else "completed"

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def from_chat(self, body: dict) -> dict:
        """The Response object of a whole chat answer."""
        choice = body["choices"][0]
        msg = choice["message"]
        text, calls = msg.get("content") or "", msg.get("tool_calls") or []
        if text or not calls:
            part = self.open_message()["content"][0]
            part["text"], part["logprobs"] = text, (choice.get("logprobs") or {}).get("content") or []
        for k, call in enumerate(calls):
            self.open_call(k, call["id"], call["function"]["name"])["arguments"] = call["function"]["arguments"]
        self.finish_reason, self.usage = choice["finish_reason"], _usage(body["usage"])
        for item in self.items:
            self.close(item)
        return self.response()

    def response(self, status: str | None = None) -> dict:
        r = self.req
        status = status or self.status
        fmt = r.text.format if r.text is not None and r.text.format is not None else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "max_tool_calls": None,
            "metadata": r.metadata or {}, "model": self.model,
            "output": self.items if status != "in_progress" else [],
            "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 0.0 if r.temperature is None else r.temperature,
            "text": {"format": fmt}, "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
            "tools": r.tools or [], "top_logprobs": r.top_logprobs or 0,
            "top_p": 1.0 if r.top_p is None else r.top_p, "truncation": "disabled",
            "usage": self.usage if status != "in_progress" else None, "user": r.user,
        }


# ---------------------------------------------------------------- streaming: chat chunks -> Responses events
class ResponseStream:
    """Responses events from chat's stream chunks, numbered in order (`sequence_number`)."""

    def __init__(self, builder: ResponseBuilder):
        self.b = builder
        self.seq = 0
        self.open: dict | None = None  # the item being streamed; each item closes before the next opens

    def event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return (f"event: {kind}\ndata: ".encode() + json.dumps(data, ensure_ascii=False, separators=(",", ":"))
                .encode() + b"\n\n")

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.b.items.index(item)}

    def start(self) -> list[bytes]:
        snap = self.b.response("in_progress")
        return [self.event("response.created", response=snap), self.event("response.in_progress", response=snap)]

    def _added(self, item: dict) -> list[bytes]:
        """Events opening `item` (just appended to the builder's items), after closing the open one."""
        out = self._done(self.open) if self.open is not None else []
        self.open = item
        out.append(self.event("response.output_item.added", output_index=len(self.b.items) - 1,
                              item={**item, "content": []} if item["type"] == "message" else dict(item)))
        if item["type"] == "message":
            part = {**item["content"][0], "text": ""}
            out.append(self.event("response.content_part.added", **self._where(item), content_index=0, part=part))
        return out

    def text(self, delta: str, logprobs: list) -> list[bytes]:
        item = self.open
        out = [] if item is not None and item["type"] == "message" else self._added(self.b.open_message())
        part = self.open["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs
        return out + [self.event("response.output_text.delta", **self._where(self.open), content_index=0,
                                 delta=delta, logprobs=logprobs)]

    def call(self, tc: dict) -> list[bytes]:
        out = []
        fn = tc.get("function") or {}
        item = self.b.calls.get(tc.get("index", 0))
        if item is None:
            item = self.b.open_call(tc.get("index", 0), tc.get("id") or _new_id("call_"), fn.get("name") or "")
            out += self._added(item)
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.event("response.function_call_arguments.delta", **self._where(item),
                                  delta=fn["arguments"]))
        return out

    def chunk(self, data: dict) -> list[bytes]:
        """The events of one chat chunk."""
        if "error" in data:
            return self.fail(data["error"])
        if data.get("usage") is not None and not data.get("choices"):
            self.b.usage = _usage(data["usage"])
        out = []
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if delta.get("content") or logprobs:  # a finish chunk may carry the last tokens' logprobs alone
                out += self.text(delta.get("content") or "", logprobs)
            for tc in delta.get("tool_calls") or ():
                out += self.call(tc)
            if choice.get("finish_reason"):
                self.b.finish_reason = choice["finish_reason"]
        return out

    def _done(self, item: dict) -> list[bytes]:
        self.b.close(item)
        self.open = None
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out += [self.event("response.output_text.done", **self._where(item), content_index=0,
                               text=part["text"], logprobs=part["logprobs"]),
                    self.event("response.content_part.done", **self._where(item), content_index=0, part=part)]
        else:
            out.append(self.event("response.function_call_arguments.done", **self._where(item),
                                  arguments=item["arguments"]))
        return out + [self.event("response.output_item.done", output_index=self.b.items.index(item), item=item)]

    def finish(self) -> list[bytes]:
        """The answer is whole: close every item, then response.completed (or .incomplete)."""
        out = [] if self.b.items else self._added(self.b.open_message())
        if self.open is not None:
            out += self._done(self.open)
        kind = "response.incomplete" if self.b.status == "incomplete" else "response.completed"
        return out + [self.event(kind, response=self.b.response())]

    def fail(self, err: dict) -> list[bytes]:
        status = err.get("status") or 500
        self.b.error = {"code": _error_code(status), "message": err.get("message", "")}
        return [self.event("error", code=err.get("code") or err.get("type"), message=err.get("message", ""),
                           param=err.get("param")),
                self.event("response.failed", response=self.b.response())]

    async def events(self, chunks):
        """The whole event stream around chat's stream body `chunks` (SSE bytes)."""
        for e in self.start():
            yield e
        ended = False
        try:
            async for raw in chunks:
                for block in raw.split(b"\n\n"):
                    if block.startswith(b":"):
                        yield block + b"\n\n"  # keep-alive
                    elif not block.startswith(b"data: ") or ended:
                        continue
                    elif block[6:].strip() == b"[DONE]":
                        for e in self.finish():
                            yield e
                        ended = True
                    else:
                        data = json.loads(block[6:])
                        ended = "error" in data
                        for e in self.chunk(data):
                            yield e
        finally:
            await chunks.aclose()  # a client gone mid-stream: the chat body cancels its job


# ---------------------------------------------------------------- the route
router = APIRouter(prefix="/v1", tags=["OpenAI API"], dependencies=[Depends(require_api_key)],
                   route_class=SizeCheckedRoute, responses=API_ERRORS)


def _chat_body(req: ResponsesRequest) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(chat_request(req))
    except ValidationError as e:
        raise renamed(validation_error(e.errors())) from None


@router.post("/responses", response_model=None,
             responses={200: {"content": EVENT_STREAM, "description": "the Response object, or with stream: "
                              "true its event stream (response.created ... response.completed)"}})
async def create_response(request: Request, body: ResponsesRequest):
    """OpenAI's Responses API (stateless): the chat path's answer as a Response object."""
    svc = request.app.state.service
    refused = refused_field(body)
    if refused:
        raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
    chat = _chat_body(body)
    # Unknown Responses fields and the model id; the tool fields are checked in chat's shape, by chat.
    checks.fields(svc, body.model_copy(update={"tools": None, "tool_choice": None}))
    try:
        answer = await chat_completions(request, chat)
    except ApiError as e:
        raise renamed(e) from None
    builder = ResponseBuilder(body, svc.name)
    if body.stream:
        return StreamingResponse(ResponseStream(builder).events(answer.body_iterator),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not isinstance(answer, dict):
        return answer  # the client went away
    return builder.from_chat(answer)


NOTHING_STORED = {200: {"description": "never: nothing is stored"}}


@router.get("/responses/{response_id}", response_model=None, responses=NOTHING_STORED)
@router.delete("/responses/{response_id}", response_model=None, responses=NOTHING_STORED)
@router.get("/responses/{response_id}/input_items", response_model=None, responses=NOTHING_STORED)
async def stored_response(response_id: str):
    """Stored responses (retrieve, delete, input items): none exist on this stateless server (404)."""
    raise ApiError(404, f"no response {clip(response_id)}: {STATELESS}", "not_found_error", param="response_id",
                   code="response_not_found")
