"""tokenizer.json through `tokenizers`, the chat template through jinja2, special ids from the files.

Text never becomes the mask id: `encode` writes a literal mask-token string as plain text. Other
special tokens are parsed in prompts (a completion prompt may hold a hand-written template), but
inside chat message content they are plain text unless the caller allows them (`chat_ids`).
"""

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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
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
            return self._compiled.render(**{**kwargs, **self.special_tokens, "messages": messages,
                                            "add_generation_prompt": add_generation_prompt})
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat_template failed to render: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False,
                 specials_in_content: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """The chat prompt's ids. Message content is plain text (a special-token string written in a
        message stays text) unless specials_in_content. continue_final: the last message (the
        assistant's) is left open for the model to continue, as the rendered text up to its content."""
        kw = template_kwargs or {}
        text = self.render_chat(messages, add_generation_prompt and not continue_final, **kw)
        contents = [m.get("content") or "" for m in messages]
        if continue_final:
            text = _cut_after(text, contents[-1])
        if specials_in_content or not any(s in c for c in contents for s in self.special_texts):
            return self.encode(text)
        # Render again with a placeholder per content, encode the template's own text with its
        # special tokens and each content as plain text.
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        shown = self.render_chat([dict(m, content=k) for m, k in zip(messages, marks)],
                                 add_generation_prompt and not continue_final, **kw)
        if continue_final:
            shown = shown[:shown.rindex(marks[-1]) + len(marks[-1])]
        parts = re.split("\ue000(\\d+)\ue001", shown)
        for variant in (contents, [c.strip() for c in contents]):
            pieces = [variant[int(p)] if i % 2 else p for i, p in enumerate(parts)]
            if "".join(pieces) == text:
                ids: list[int] = []
                for i, piece in enumerate(pieces):
                    ids += self.encode(piece, specials=not i % 2) if piece else []
                return ids
        raise TemplateError("a message holds special-token text and this chat template transforms message "
                            "content in a way that cannot keep it as plain text")

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        return cls(path)
