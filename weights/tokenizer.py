"""tokenizer.json through `tokenizers`, the chat template through jinja2, special ids from the files.

Text never becomes the mask id: `encode` writes a literal mask-token string as plain text. Other
special tokens are parsed in prompts (a completion prompt may hold a hand-written template), but
inside chat message content they are plain text unless the caller allows them (`chat_ids`).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range


# JSON may carry a lone UTF-16 surrogate ("\ud800"); json.loads joins valid pairs, so any surrogate
# left in a str is lone. It is not a character and no tokenizer can encode it: it becomes U+FFFD.
_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


class TemplateError(ValueError):
    """The chat template cannot render these messages."""


# Bounds on one chat-template render (the template is the checkpoint's, its inputs the client's).
RENDER_MAX_CHARS = 1 << 22   # characters a render may produce (and any string or list it builds)
RENDER_TIMEOUT_S = 2.0       # seconds a render may take
BIG_NUMBER = 10 ** 6         # integer arguments past this (widths, repeats, exponents) are refused
# a %-format or str.format width or precision of a million or more
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
# chat_template_kwargs: plain JSON data, bounded.
KWARGS_MAX_ITEMS = 4096      # values in all (nested ones included)
KWARGS_MAX_DEPTH = 16


class _RenderLimit(TemplateError):
    pass


_budget = threading.local()  # the render in progress on this thread: (deadline, max_chars)


def _tick() -> None:
    b = getattr(_budget, "limits", None)
    if b is not None and time.monotonic() > b[0]:
        raise _RenderLimit(f"it took longer than {RENDER_TIMEOUT_S:g} s")


def _check_size(value) -> None:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > RENDER_MAX_CHARS:
        raise _RenderLimit(f"it built a value of more than {RENDER_MAX_CHARS} items")


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > BIG_NUMBER:
            raise _RenderLimit(f"a call got the number {a}, past the limit of {BIG_NUMBER}")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with bounds: every call, operator, filter, attribute lookup and `range` step
    checks the render's deadline; strings and lists a template builds (`*`, `+`, `%`, filters,
    methods) and integer arguments are bounded, so no template input makes a render run away."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and all(isinstance(x, (int, float)) for x in (left, right)) \
                and abs(right) > 64 and abs(left) > 1:
            raise _RenderLimit(f"{left!r} ** {right!r} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_MAX_CHARS:
                    raise _RenderLimit(f"it built a value of more than {RENDER_MAX_CHARS} items")
        if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise _RenderLimit("a format width or precision past the limit")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > RENDER_MAX_CHARS:
            raise _RenderLimit(f"it built a value of more than {RENDER_MAX_CHARS} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _tick()
        _check_args(args, kwargs)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str) and getattr(method, "__name__", "").startswith("format") \
                and _WIDE_FORMAT.search(owner):
            raise _RenderLimit("a format width or precision past the limit")
        out = super().call(__context, __obj, *args, **kwargs)
        _check_size(out)
        return out

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


# The functions every template sees (jinja's sandbox globals and those added in Tokenizer._template).
_SANDBOX_GLOBALS = frozenset(ImmutableSandboxedEnvironment().globals) | {"raise_exception", "strftime_now"}


def _bounded_filter(name, f):
    first = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1  # past the context and the value

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _tick()
        _check_args(args[first:], kwargs)
        if name == "format" and any(isinstance(a, str) and _WIDE_FORMAT.search(a) for a in args[:2]):
            raise _RenderLimit("a format width or precision past the limit")
        out = f(*args, **kwargs)
        _check_size(out)
        return out
    return bounded


class _BoundedRange:
    """`range()` in a template: jinja's safe range, each step checking the render's deadline."""

    def __init__(self, *args):
        self.r = safe_range(*args)

    def __iter__(self):
        for x in self.r:
            _tick()
            yield x

    def __len__(self):
        return len(self.r)

    def __getitem__(self, i):
        return self.r[i]

    def __contains__(self, x):
        return x in self.r

    def __bool__(self):
        return bool(self.r)


def check_template_kwargs(kwargs: dict, reserved) -> None:
    """chat_template_kwargs: template variable names (not a name the renderer sets itself: a
    sandbox function, the messages, a special token) holding plain JSON data (strings, numbers,
    booleans, null, lists and objects of those), at most KWARGS_MAX_ITEMS values nested at most
    KWARGS_MAX_DEPTH deep. TemplateError names the first offending key."""
    if not isinstance(kwargs, dict):
        raise TemplateError("chat_template_kwargs must be an object")
    count = 0

    def walk(v, depth, where):
        nonlocal count
        count += 1
        if count > KWARGS_MAX_ITEMS:
            raise TemplateError(f"chat_template_kwargs holds more than {KWARGS_MAX_ITEMS} values")
        if depth > KWARGS_MAX_DEPTH:
            raise TemplateError(f"chat_template_kwargs.{where} nests deeper than {KWARGS_MAX_DEPTH} levels")
        if v is None or isinstance(v, (str, bool, int, float)):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 63:
                raise TemplateError(f"chat_template_kwargs.{where}: integer out of range")
            return
        if isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, depth + 1, f"{where}.{i}")
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TemplateError(f"chat_template_kwargs.{where}: keys must be strings")
                walk(x, depth + 1, f"{where}.{k}")
            return
        raise TemplateError(f"chat_template_kwargs.{where}: {type(v).__name__} is not plain JSON data")

    for name, v in kwargs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TemplateError(f"chat_template_kwargs: {name!r} is not a template variable name")
        if name in reserved:
            raise TemplateError(f"chat_template_kwargs: {name!r} is set by the server (a template function "
                                "or variable) and cannot be replaced")
        walk(v, 1, name)


def _strings(value, out: list):
    """Every string inside a kwargs value, depth first."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for x in value:
            _strings(x, out)
    elif isinstance(value, dict):
        for x in value.values():
            _strings(x, out)
    return out


def _replace_strings(value, fn):
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_replace_strings(x, fn) for x in value]
    if isinstance(value, dict):
        return {k: _replace_strings(x, fn) for k, x in value.items()}
    return value


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message):
    raise TemplateError(message)


def _ids(tok, text: str) -> list[int]:
    # encode_batch releases the GIL while it works (encode does not): a long text encoded in a
    # worker thread then leaves the server's event loop free.
    return tok.encode_batch([text], add_special_tokens=False)[0].ids


def _cut_after(text: str, content: str) -> str:
    """The rendered chat up to the end of the final message's content (its turn left open)."""
    for c in (content, content.strip()):
        if c and c in text:
            return text[:text.rindex(c) + len(c)]
    raise TemplateError("continue_final_message: the final message's content is not in the rendered chat")


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        self._tok = HFTokenizer.from_file(str(self.path / "tokenizer.json"))
        cfg_file = self.path / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.special_tokens = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(self.config.get(name))
            if text is not None:
                self.special_tokens[name] = text
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template
        self._compiled = None
        self._plain_tok = None
        self.mask_token: str | None = None  # set by the loader: always encoded as plain text
        self.special_texts = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        self._max_chars: int | None = None
        self._vocab_size: int | None = None

    @property
    def max_chars_per_token(self) -> int | None:
        """At most how many characters of text one token covers, when the tokenizer bounds it: a BPE
        model without a normalizer and without fused unknown tokens maps every character to at least
        one byte of some token, so a text of C characters needs at least C / this many tokens. None
        for other tokenizers (a normalizer may shrink the text; a fused unknown token covers any run).
        The server uses it to refuse a text longer than the context can hold before encoding it."""
        if self._max_chars is None:
            from tokenizers.models import BPE

            model = self._tok.model
            bounded = (isinstance(model, BPE) and self._tok.normalizer is None
                       and not (model.unk_token and model.fuse_unk))
            self._max_chars = (max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))
                               if bounded else 0)
        return self._max_chars or None

    @property
    def vocab_size(self) -> int:
        """One past the largest id the tokenizer knows (added tokens included): ids [0, vocab_size)."""
        if self._vocab_size is None:
            self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return self._vocab_size

    def token_to_id(self, text: str):
        return self._tok.token_to_id(text)

    def json_text(self) -> str:
        """The tokenizer as tokenizer.json text (what a grammar engine builds its vocabulary from)."""
        return self._tok.to_str()

    def encode(self, text: str, specials: bool = True) -> list[int]:
        """Token ids of text. specials=False: special-token strings are plain text too. Either way a
        literal mask-token string is plain text (text never becomes the mask id)."""
        text = replace_lone_surrogates(text)
        if not specials:
            return self._encode_plain(text)
        m = self.mask_token
        if not m or m not in text:
            return _ids(self._tok, text)
        ids: list[int] = []
        for i, piece in enumerate(text.split(m)):
            if i:
                ids += self._encode_plain(m)
            if piece:
                ids += _ids(self._tok, piece)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self._plain_tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._plain_tok = HFTokenizer.from_str(self._tok.to_str())
            self._plain_tok.encode_special_tokens = True
        ids = _ids(self._plain_tok, text)
        mask = self.token_to_id(self.mask_token) if self.mask_token else None
        if mask is not None and mask in ids:  # merges that rebuild the mask string: one character at a time
            ids = [t for ch in text for t in _ids(self._plain_tok, ch)]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(i)

    def _template(self):
        if not self.chat_template:
            raise TemplateError("this checkpoint ships no chat_template in tokenizer_config.json")
        if self._compiled is None:
            env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            for name in list(env.filters):
                env.filters[name] = _bounded_filter(name, env.filters[name])
            env.globals.pop("lipsum", None)  # generated filler text: no template needs it
            env.globals["range"] = _BoundedRange
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TemplateError(f"the chat_template does not compile: {e}") from None
        return self._compiled

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable (then it renders tools, tool calls and
        tool results itself; otherwise the server's fallback format does: server.tools)."""
        if not self.chat_template:
            return False
        if getattr(self, "_supports_tools", None) is None:
            from jinja2 import meta

            try:
                names = meta.find_undeclared_variables(self._template().environment.parse(self.chat_template))
            except (jinja2.TemplateError, TemplateError):
                names = ()  # a template that does not compile is refused when it renders
            self._supports_tools = "tools" in names
        return self._supports_tools

    @property
    def reserved_template_names(self) -> set[str]:
        """Names a client's chat_template_kwargs cannot take: what the renderer sets itself."""
        return _SANDBOX_GLOBALS | set(self.special_tokens) | {"messages", "add_generation_prompt"}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template rendered (bounded: RENDER_MAX_CHARS of output, RENDER_TIMEOUT_S). Any
        failure of the template is a TemplateError naming it."""
        template = self._template()
        if kwargs:
            check_template_kwargs(kwargs, self.reserved_template_names)
        variables = {**kwargs, **self.special_tokens, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        _budget.limits = (time.monotonic() + RENDER_TIMEOUT_S, RENDER_MAX_CHARS)
        try:
            parts, size = [], 0
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > RENDER_MAX_CHARS:
                    raise _RenderLimit(f"its output passed {RENDER_MAX_CHARS} characters")
                _tick()
                parts.append(chunk)
            return "".join(parts)
        except _RenderLimit as e:
            raise TemplateError(f"the chat_template was stopped: {e}") from None
        except TemplateError:
            raise  # raise_exception(): the template's own message
        except RecursionError:
            raise TemplateError("the chat_template failed to render: it recursed too deeply") from None
        except Exception as e:  # noqa: BLE001 (a template can raise anything: TypeError, ZeroDivisionError...)
            raise TemplateError(f"the chat_template failed to render: {type(e).__name__}: {e}") from None
        finally:
            _budget.limits = None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False,
                 specials_in_content: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """The chat prompt's ids. Message content is plain text (a special-token string written in a
        message stays text) unless specials_in_content. continue_final: the last message (the
        assistant's) is left open for the model to continue, as the rendered text up to its content."""
        kw = template_kwargs or {}
        gen = add_generation_prompt and not continue_final
        text = self.render_chat(messages, gen, **kw)
        contents = [m.get("content") or "" for m in messages]
        if continue_final:
            text = _cut_after(text, contents[-1])

        def special(t):
            return any(s in t for s in self.special_texts)
        # Kwargs strings a template prints are client text too: plain text, as content is.
        kw_special = [t for t in dict.fromkeys(_strings(kw, [])) if special(t)]
        if specials_in_content or not (kw_special or any(special(c) for c in contents)):
            return self.encode(text)
        # Render again with a placeholder per content (and per kwargs string holding special-token
        # text), encode the template's own text with its special tokens and those as plain text.
        plain = contents + kw_special
        marks = [f"\ue000{i}\ue001" for i in range(len(plain))]
        kw_marks = dict(zip(kw_special, marks[len(contents):]))
        shown = self.render_chat([dict(m, content=k) for m, k in zip(messages, marks)], gen,
                                 **_replace_strings(kw, lambda t: kw_marks.get(t, t)))
        if continue_final:
            last = marks[len(messages) - 1]
            shown = shown[:shown.rindex(last) + len(last)]
        parts = re.split("\ue000(\\d+)\ue001", shown)
        for variant in (plain, [c.strip() for c in contents] + kw_special):
            pieces = [variant[int(p)] if i % 2 else p for i, p in enumerate(parts)]
            if "".join(pieces) == text:
                ids: list[int] = []
                for i, piece in enumerate(pieces):
                    ids += self.encode(piece, specials=not i % 2) if piece else []
                return ids
        raise TemplateError("a message or a chat_template_kwargs string holds special-token text and this "
                            "chat template transforms it in a way that cannot keep it as plain text")

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        return cls(path)
