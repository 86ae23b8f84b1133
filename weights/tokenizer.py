"""tokenizer.json through `tokenizers`, the chat template through jinja2, special ids from the files."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


# JSON may carry a lone UTF-16 surrogate ("\ud800"); json.loads joins valid pairs, so any surrogate
# left in a str is lone. It is not a character and no tokenizer can encode it: it becomes U+FFFD.
_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


class TemplateError(ValueError):
    """The chat template cannot render these messages."""


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message):
    raise TemplateError(message)


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
        self._max_chars: int | None = None

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
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, text: str):
        return self._tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long text encoded in a
        # worker thread then leaves the server's event loop free.
        return self._tok.encode_batch([replace_lone_surrogates(text)], add_special_tokens=False)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(i)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TemplateError("this checkpoint ships no chat_template in tokenizer_config.json")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TemplateError(f"chat_template does not compile: {e}") from None
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat_template failed to render: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        return cls(path)
