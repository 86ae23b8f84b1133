"""Function tools on chat completions: the request's `tools`, `tool_choice` and `parallel_tool_calls`
checked, the grammar that enforces a call, the prompt that shows the tools and past calls, and the
answer's calls read back in OpenAI's shape (whole or streamed).

The call format (what the model writes, and what the grammar admits) is one tagged, compact JSON
object per call, calls separated by a newline:

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

- `tool_choice: "required"` (or a named function): the answer is one call (one or more, newline
  separated, with `parallel_tool_calls`; exactly one of the named function) whose arguments follow
  that function's `parameters` schema, by construction (`sampler.constraint`, the frontier rule).
- `"auto"` (the default with tools): the answer is free text or calls; text that starts with
  `<tool_call>` must be calls. `"none"`: plain generation, no grammar.

Prompts: a chat template that reads a `tools` variable gets the tools as HF templates expect
(`[{"type": "function", "function": {...}}]`), assistant messages with `tool_calls` (arguments as
objects) and `role: "tool"` messages as they are. Other templates get the fallback: a system
preamble listing the functions as JSON and the call format, past calls written in the call format
in the assistant's content, tool results as user turns `<tool_response>{"name":..,"content":..}
</tool_response>` (consecutive results in one turn).

Public: `tool_request(req)` (the checked fields, or None), `tool_constraint(svc, req)`,
`prompt_messages(tokenizer, req, messages)`, `parse_tool_calls(text)` and `ToolChoice` (a chat
choice whose answer may be calls).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from sampler.constraint import JSON_OPTIONS, ConstraintError, GrammarVocab, compile_constraint
from server.answer import Choice
from server.errors import ApiError, clip

CALL_OPEN, CALL_CLOSE, CALL_SEP = "<tool_call>", "</tool_call>", "\n"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
HEADER = re.compile(r'<tool_call>\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')
CHOICES = ("none", "auto", "required")
MAX_TOOLS = 128
CACHE_SIZE = 128


_bad = ApiError.bad_field  # a 400 naming the field


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict  # the arguments' JSON schema (an object schema)
    strict: bool | None


@dataclass(frozen=True)
class ToolRequest:
    """A request's checked tool fields. `choice`: none, auto, required or function (`named`)."""

    functions: tuple[Function, ...]
    choice: str
    named: str | None
    parallel: bool

    @property
    def calls(self) -> bool:
        """Whether the answer may hold calls (a grammar applies)."""
        return bool(self.functions) and self.choice != "none"


def _function(i: int, tool) -> Function:
    where = f"tools.{i}"
    if not isinstance(tool, dict):
        raise _bad(where, f"{where} must be an object {{\"type\": \"function\", \"function\": {{...}}}}")
    if tool.get("type") != "function":
        raise _bad(f"{where}.type", f"{where}.type must be \"function\" (the only tool type this server "
                   f"runs), got {clip(tool.get('type'), 64)}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", f"{where}.function must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _bad(f"{where}.function.name", f"{where}.function.name must be 1 to 64 letters, digits, "
                   f"underscores or dashes, got {clip(name, 80)}")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _bad(f"{where}.function.description", f"{where}.function.description must be a string")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{where}.function.strict", f"{where}.function.strict must be true or false")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(params, dict):
        raise _bad(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON schema object")
    if params.get("type", "object") != "object":
        raise _bad(f"{where}.function.parameters", f"{where}.function.parameters must describe an object "
                   "(\"type\": \"object\"): arguments are a JSON object")
    return Function(name, desc, {**params, "type": "object"}, strict)


def _choice(value, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if isinstance(value, str):
        if value not in CHOICES:
            raise _bad("tool_choice", f"tool_choice must be none, auto, required or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {clip(value, 64)}")
        if value != "none" and not names:
            raise _bad("tool_choice", f"tool_choice {value!r} needs tools")
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise _bad("tool_choice", "tool_choice names a function as {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}")
    if name not in names:
        raise _bad("tool_choice", f"tool_choice names the function {clip(name, 80)}, which is not "
                   f"among the tools ({', '.join(names) or 'none given'})")
    return "function", name


def tool_request(req) -> ToolRequest | None:
    """The checked `tools`, `tool_choice` and `parallel_tool_calls` of a chat request (None when it
    has neither tools nor a tool_choice). ApiError 400 naming the field otherwise."""
    if "tools" not in type(req).model_fields:  # a completion: `tools` would be an unknown field
        return None
    tools, choice = req.tools, req.tool_choice
    if not tools and choice is None:
        return None
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "tools must be a list of function tools")
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    functions, seen = [], {}
    for i, t in enumerate(tools):
        f = _function(i, t)
        if f.name in seen:
            raise _bad(f"tools.{i}.function.name", f"tools.{i}.function.name {f.name!r} repeats "
                       f"tools.{seen[f.name]}'s name: function names must be unique")
        seen[f.name] = i
        functions.append(f)
    kind, named = _choice(choice, list(seen))
    parallel = getattr(req, "parallel_tool_calls", None) is not False
    return ToolRequest(tuple(functions), kind, named, parallel)


# ---------------------------------------------------------------------------------------------- grammar
OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf",
             "$ref", "not", "if")


def arguments_schema(parameters: dict) -> dict:
    """The schema the grammar holds a call's arguments to: the function's parameters, with only the
    declared properties at the top level when the schema says nothing about others (a narrower
    language: every answer still validates against the parameters, and a model cannot add keys
    until the length runs out)."""
    out = {**parameters, "x-guidance": JSON_OPTIONS}
    if "properties" in out and not any(k in out for k in OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def _call_rule(f: Function) -> str:
    head = CALL_OPEN + '{"name":' + json.dumps(f.name) + ',"arguments":'
    schema = arguments_schema(f.parameters)
    return f"{json.dumps(head)} %json {json.dumps(schema)} {json.dumps('}' + CALL_CLOSE)}"


def grammar(tr: ToolRequest) -> str:
    """The Lark grammar (llguidance's, with %json schemas) of the answers `tr` admits."""
    fns = [f for f in tr.functions if tr.named is None or f.name == tr.named]
    lines = [f"fn_{i}: {_call_rule(f)}" for i, f in enumerate(fns)]
    lines.append("call: " + " | ".join(f"fn_{i}" for i in range(len(fns))))
    lines.append(f"calls: call ({json.dumps(CALL_SEP)} call)*" if tr.parallel and tr.named is None
                 else "calls: call")
    if tr.choice == "auto":
        # free text, except text that opens a call: that must be calls
        lines.append(f"TEXT: /(.|\\n)*/ & ~/{re.escape(CALL_OPEN)}(.|\\n)*/")
        lines.insert(0, "start: calls | TEXT")
    else:
        lines.insert(0, "start: calls")
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=CACHE_SIZE)
def _compiled(vocab: GrammarVocab, field: str, kind: str, text: str):
    return compile_constraint(kind, json.loads(text), vocab, field=field)


def _culprit(vocab: GrammarVocab, tr: ToolRequest) -> None:
    """Raise the 400 naming the first function whose parameters do not compile."""
    for i, f in enumerate(tr.functions):
        field = f"tools.{i}.function.parameters"
        try:
            _compiled(vocab, field, "json_schema", json.dumps(f.parameters))
        except ConstraintError as e:
            raise _bad(field, str(e)) from None


def tool_constraint(svc, req):
    """The compiled grammar of a request whose answer may be calls (None: no tools, or
    tool_choice none). Checks every function's parameters even then (400 naming the function)."""
    tr = tool_request(req)
    if tr is None or not tr.functions:
        return None
    from server.constraints import requested

    asked = requested(req)
    if tr.calls and asked is not None:
        raise _bad(asked[0], f"{asked[0]} cannot be combined with tools under tool_choice {tr.choice!r}: "
                   "a call's arguments already follow its function's parameters; send tool_choice none "
                   "or leave the tools out")
    vocab = GrammarVocab.of(svc.bundle)
    shown = tr if tr.calls else ToolRequest(tr.functions, "auto", None, tr.parallel)
    try:
        c = _compiled(vocab, "tools", "grammar", json.dumps(grammar(shown)))
    except ConstraintError as e:
        _culprit(vocab, tr)
        raise _bad("tools", str(e)) from None
    return c if tr.calls else None


# ---------------------------------------------------------------------------------------------- prompt
def call_text(name: str, arguments: str) -> str:
    """One call in the call format (arguments: JSON text, written compact when it parses)."""
    try:
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        pass
    return CALL_OPEN + '{"name":' + json.dumps(name) + ',"arguments":' + arguments + "}" + CALL_CLOSE


def _calls_of(i: int, m) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of an assistant message's tool_calls, checked."""
    out = []
    for j, tc in enumerate(m.tool_calls or []):
        where = f"messages.{i}.tool_calls.{j}"
        fn = tc.get("function") if isinstance(tc, dict) else None
        name, args = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(args, (str, dict)):
            raise _bad(where, f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                       "{\"name\": ..., \"arguments\": \"<JSON>\"}}")
        if tc.get("type", "function") != "function":
            raise _bad(f"{where}.type", f"{where}.type must be \"function\"")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append((str(tc.get("id") or ""), name, args))
    if m.role != "assistant" and out:
        raise _bad(f"messages.{i}.tool_calls", "only assistant messages carry tool_calls")
    return out


def _preamble(tr: ToolRequest) -> str:
    fns = [f for f in tr.functions if tr.named is None or f.name == tr.named]
    listed = "\n".join(json.dumps({"name": f.name, **({"description": f.description} if f.description else {}),
                                   "parameters": f.parameters}, ensure_ascii=False, separators=(",", ":"))
                       for f in fns)
    return "Tools:\n" + listed + "\nCall: " + CALL_OPEN + '{"name":..,"arguments":{..}}' + CALL_CLOSE


def _fallback(req, messages: list[dict], calls: list, tr: ToolRequest | None) -> list[dict]:
    """Messages for a template without tools: calls in the content, results as user turns."""
    out, names = [], {}
    for m, (src, mc) in zip(messages, zip(req.messages, calls)):
        if mc:
            names.update({cid: name for cid, name, _ in mc})
            text = CALL_SEP.join(call_text(name, args) for _, name, args in mc)
            out.append({"role": "assistant", "content": (m["content"] + CALL_SEP if m["content"] else "") + text})
        elif src.role == "tool":
            result = RESULT_OPEN + json.dumps({"name": names.get(src.tool_call_id, ""), "content": m["content"]},
                                              ensure_ascii=False) + RESULT_CLOSE
            if out and out[-1].get("_results"):
                out[-1]["content"] += CALL_SEP + result
            else:
                out.append({"role": "user", "content": result, "_results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tr is not None and tr.calls:
        system = next((m for m in out if m["role"] in ("system", "developer")), None)
        if system is None:
            out.insert(0, {"role": "system", "content": _preamble(tr)})
        else:
            system["content"] = (system["content"] + "\n\n" if system["content"] else "") + _preamble(tr)
    return out


def _with_template(req, messages: list[dict], calls: list) -> list[dict]:
    """Messages in the shape HF chat templates with tool support read."""
    out = []
    for m, src, mc in zip(messages, req.messages, calls):
        m = dict(m)
        if mc:
            m["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": _loads(args)}}
                               for cid, name, args in mc]
        if src.role == "tool":
            m["tool_call_id"] = src.tool_call_id
        if src.name is not None:
            m["name"] = src.name
        out.append(m)
    return out


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _no_special_text(tokenizer, calls: list) -> None:
    """Calls a template renders itself are client text: no special-token text in them."""
    for i, mc in enumerate(calls):
        for cid, name, args in mc:
            if any(t in x for x in (cid, name, args) for t in tokenizer.special_texts):
                raise _bad(f"messages.{i}.tool_calls", f"messages.{i}.tool_calls holds special-token text")


def prompt_messages(tokenizer, req, messages: list[dict], specials_ok: bool = False) -> tuple[list[dict], dict]:
    """The chat's messages (plain {"role", "content"} dicts, in request order) rendered for tools:
    (messages for the template, template variables to add). Checks tool messages and calls.
    `specials_ok`: the server parses special tokens in chat content (--chat-special-tokens)."""
    tr = tool_request(req)
    calls = []
    for i, m in enumerate(req.messages):
        calls.append(_calls_of(i, m))
        if m.role == "tool" and not isinstance(m.tool_call_id, str):
            raise _bad(f"messages.{i}.tool_call_id", f"messages.{i}: a tool message needs the tool_call_id "
                       "of the call it answers")
    if not any(calls) and not any(m.role == "tool" for m in req.messages) and (tr is None or not tr.functions):
        return messages, {}
    if tokenizer.supports_tools:
        if not specials_ok:
            _no_special_text(tokenizer, calls)
        extra = {"tools": [{"type": "function", "function": {
            "name": f.name, **({"description": f.description} if f.description else {}),
            "parameters": f.parameters}} for f in tr.functions]} if tr is not None and tr.functions else {}
        return _with_template(req, messages, calls), extra
    return _fallback(req, messages, calls, tr), {}


# ---------------------------------------------------------------------------------------------- answer
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class CallReader:
    """Reads an answer in the call format as it grows and says what to stream: content deltas (text
    answers under `auto`) or OpenAI `tool_calls` deltas (a call's id, type and name once its header
    is known, then its arguments as they come). `calls` holds the calls read so far."""

    def __init__(self, calls_only: bool):
        self.text = ""
        self.mode = "calls" if calls_only else "open"   # open: could still be either (auto)
        self.calls: list[dict] = []
        self.pos = 0            # characters of text read
        self.sent = 0           # characters of text sent as content
        self.depth = None       # inside a call's arguments: JSON nesting depth (None: not inside)
        self.in_str = self.esc = False
        self.closed = 0         # calls whose closing tag was read

    @property
    def complete(self) -> bool:
        """Every character read into calls that all closed."""
        return bool(self.calls) and self.closed == len(self.calls) and self.pos == len(self.text)

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        if self.mode == "open":
            if CALL_OPEN.startswith(self.text):
                return []
            self.mode = "calls" if self.text.startswith(CALL_OPEN) else "text"
        if self.mode == "text":
            return self._content()
        return self._read_calls() if self.mode == "calls" else []

    def finish(self) -> list[dict]:
        """The answer is final: text never read as calls goes out as content."""
        if self.mode == "open" or (self.mode == "calls" and not self.calls):
            self.mode = "text"
            return self._content()
        return []

    def _content(self) -> list[dict]:
        d = self.text[self.sent:]
        self.sent = len(self.text)
        return [{"content": d}] if d else []

    def _read_calls(self) -> list[dict]:
        out = []
        while True:
            if self.depth is None:
                rest = self.text[self.pos:]
                if self.closed < len(self.calls):   # after the arguments: the closing brace and tag
                    tail = "}" + CALL_CLOSE
                    if len(rest) < len(tail):
                        return out
                    if not rest.startswith(tail):
                        self.mode = "broken"
                        return out
                    self.pos += len(tail)
                    self.closed += 1
                    continue
                sep = CALL_SEP if self.calls else ""
                m = HEADER.match(rest, len(sep)) if rest.startswith(sep) else None
                if m is None:
                    return out
                call = {"id": new_call_id(), "type": "function", "function": {"name": m.group(1), "arguments": ""}}
                self.calls.append(call)
                out.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                            "function": dict(call["function"])}]})
                self.pos += m.end()
                self.depth = 0
            chunk = self._scan_arguments()
            if chunk:
                self.calls[-1]["function"]["arguments"] += chunk
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": chunk}}]})
            if self.depth is not None:
                return out

    def _scan_arguments(self) -> str:
        """The arguments' characters now known; ends the arguments at the brace that closes them."""
        start = i = self.pos
        text = self.text
        while i < len(text):
            ch = text[i]
            i += 1
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.depth = None
                    break
        self.pos = i
        return text[start:i]


def parse_tool_calls(text: str, calls_only: bool = False) -> tuple[str | None, list[dict]]:
    """A whole generated answer read as (content, tool_calls): calls in OpenAI's chat shape
    `[{"id": "call_...", "type": "function", "function": {"name": ..., "arguments": "<JSON>"}}]` and
    content None when the answer is calls in the call format; (text, []) otherwise."""
    r = CallReader(calls_only)
    r.feed(text)
    r.finish()
    if r.complete and r.mode == "calls":
        return None, r.calls
    return text, []


class ToolChoice(Choice):
    """A chat choice under tools: its deltas are lists of OpenAI delta objects (content, or
    tool_calls), and its final answer carries `tool_calls` (finish_reason tool_calls) when the
    model called."""

    def __init__(self, index, decoder, stop_ids, max_tokens, stops, *rest, tools: ToolRequest):
        super().__init__(index, decoder, stop_ids, max_tokens, stops, *rest)
        self.reader = CallReader(calls_only=tools.choice != "auto")

    def _settle(self, deltas: list[dict]) -> list[dict]:
        if self.answer is None or getattr(self.answer, "tool_calls", None) is not None:
            return deltas
        deltas += self.reader.finish()
        calls = self.reader.calls if self.reader.mode == "calls" else []
        self.answer.tool_calls = [dict(c, function=dict(c["function"])) for c in calls]
        if calls and self.reader.complete and self.answer.finish_reason == "stop":
            self.answer.finish_reason = "tool_calls"
        return deltas

    def on_progress(self, prefix_ids) -> list[dict]:
        return self._settle(self.reader.feed(super().on_progress(prefix_ids)))

    def on_done(self, gen_ids) -> list[dict]:
        return self._settle(self.reader.feed(super().on_done(gen_ids)))


def choice_class(req):
    """The choice class of a chat request: ToolChoice when its answer may be calls, with the
    request's checked tools bound; None otherwise."""
    tr = tool_request(req)
    if tr is None or not tr.calls:
        return None
    return lambda *a: ToolChoice(*a, tools=tr)
