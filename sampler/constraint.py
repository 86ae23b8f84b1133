"""Structured output: a grammar per request, compiled once, and its state as the answer is committed.

The grammar engine is llguidance (see BENCHMARKS.md for the measurements behind the choice): it
computes allowed-token masks from the checkpoint's own tokenizer.json on the CPU, and compiles
JSON schemas, regular expressions, choices and Lark / GBNF grammars.

    vocab = GrammarVocab.of(bundle)                 # once per model (about 0.1 s for 100k tokens)
    c = compile_constraint("json_schema", schema, vocab, field="response_format")   # once per request
    SamplingParams(..., constraint=c)               # handed to the batch as data

`compile_constraint` raises `ConstraintError` (a `ParamError` naming the request field) for an
invalid schema, regex or grammar and for a schema feature the engine cannot compile.

`GrammarState` is what the batch keeps per constrained request: an llguidance matcher over the
committed prefix of the answer, the allowed-token mask of the next position, the tokens the
grammar forces next, and whether the answer may end here. The commit rule that uses it is the
frontier rule of `sampler.llada_batch` (documented in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from sampler.params import ParamError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# Compact JSON (no optional whitespace): a model cannot pad an answer with blanks until the
# length runs out, and answers are shorter.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SPEC_CHARS = 1 << 20


# Texts a short completion prefers, first to last: close a string (inside one, every other closer
# is text), an object, an array; separate (a required key still missing: the grammar then forces
# it); the shortest number; then a short word.
CLOSERS = ('"', "}", "]", ",", "0", ":", "a", " ", "\n")
CLOSING_MARGIN = 3  # tokens of slack kept between the room left and the shortest completion (a token
                    # that opens a structure may lengthen the completion; the rule is checked every token)


class ConstraintError(ParamError):
    """The constraint cannot be compiled; `field` names the request field it came from."""


class GrammarVocab:
    """The grammar engine's view of a tokenizer: built once per model from its tokenizer.json, with
    the model's stop ids as the tokens that end an answer."""

    def __init__(self, tokenizer_json: str, stop_ids, logit_width: int):
        from llguidance import LLTokenizer

        self.stop_ids = sorted({int(i) for i in stop_ids})
        self.ll = LLTokenizer(tokenizer_json, eos_token=self.stop_ids)
        self.vocab_size = self.ll.vocab_size   # ids the grammar knows: [0, vocab_size)
        self.logit_width = int(logit_width)    # columns of the model's logits (>= vocab_size)
        # Tokens that close what is open, in the order a short completion prefers them (the
        # closing rule of `GrammarState.closing`): each one text of one token in this vocabulary.
        self.closers = [t[0] for t in (self.ll.tokenize_str(c) for c in CLOSERS) if len(t) == 1]

    @classmethod
    def of(cls, bundle) -> "GrammarVocab":
        """The vocabulary of a loaded checkpoint (cached on the bundle)."""
        vocab = getattr(bundle, "_grammar_vocab", None)
        if vocab is None:
            if bundle.tokenizer is None:
                raise ConstraintError("response_format", "structured output needs the checkpoint's "
                                      "tokenizer; this model has none")
            vocab = cls(bundle.tokenizer.json_text(), bundle.special.stop, bundle.config.embedding_size)
            bundle._grammar_vocab = vocab
        return vocab


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled constraint: the grammar (llguidance's serialized form) and the vocabulary it runs
    on. Immutable and shareable; each request gets its own `GrammarState`."""

    kind: str
    field: str
    grammar: str
    vocab: GrammarVocab = field(repr=False)
    limit: int | None = None  # answer tokens when fewer than the span (max_tokens): the closing rule's room

    def within(self, limit: int | None) -> "Constraint":
        """This constraint for an answer cut at `limit` tokens."""
        return self if limit is None or limit == self.limit else replace(self, limit=int(limit))

    def start(self) -> "GrammarState":
        return GrammarState(self)


def _grammar_text(kind: str, spec, field_name: str) -> str:
    from llguidance import LLMatcher, grammar_from

    def bad(msg):
        raise ConstraintError(field_name, msg)

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                bad(f"{field_name}: the schema is not valid JSON ({e})")
        if not isinstance(spec, (dict, bool)):
            bad(f"{field_name}: a JSON schema is an object, got {type(spec).__name__}")
        if isinstance(spec, bool):
            spec = {} if spec else {"not": {}}
        return LLMatcher.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(spec, str):
            bad(f"{field_name}: a regular expression is a string")
        return grammar_from("regex", spec)
    if kind == "choice":
        if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(s, str) for s in spec):
            bad(f"{field_name}: the choices are a non-empty list of strings")
        if any(s == "" for s in spec):
            bad(f"{field_name}: a choice is an empty string")
        return grammar_from("choice", json.dumps(list(spec)))
    if kind == "grammar":
        if not isinstance(spec, str):
            bad(f"{field_name}: a grammar is a string (Lark or GBNF)")
        try:
            return grammar_from("grammar", spec)
        except ValueError as e:
            bad(f"{field_name}: {e}")
    raise ConstraintError(field_name, f"unknown constraint kind {kind!r}; one of {', '.join(KINDS)}")


def _one_line(error: str, limit: int = 400) -> str:
    """The engine's (multi-line) message on one line, without its source excerpt."""
    lines = [l.strip() for l in error.strip().splitlines()]
    lines = [l for l in lines if l and l != "^" and not l[:1].isdigit()]
    text = " ".join(lines)
    return text if len(text) <= limit else text[:limit] + "..."


def compile_constraint(kind: str, spec, vocab: GrammarVocab, field: str | None = None) -> Constraint:
    """Compile a constraint of `kind` (json_object, json_schema, regex, choice, grammar) from the
    request's value `spec` for `vocab`. Errors are `ConstraintError` naming `field` (default: the
    kind) and what is wrong: a malformed schema, regex or grammar, or a feature the engine does not
    support (its message says which)."""
    from llguidance import LLMatcher

    field = field or kind
    size = len(spec) if isinstance(spec, str) else len(json.dumps(spec)) if spec is not None else 0
    if size > MAX_SPEC_CHARS:
        raise ConstraintError(field, f"{field}: the constraint is longer than {MAX_SPEC_CHARS} characters")
    grammar = _grammar_text(kind, spec, field)
    error = LLMatcher.validate_grammar(grammar, vocab.ll)
    if error:
        raise ConstraintError(field, f"{field}: cannot compile the {kind.replace('_', ' ')}: "
                              f"{_one_line(error)}")
    c = Constraint(kind, field, grammar, vocab)
    state = c.start()  # surfaces errors found only when the matcher is built (e.g. empty languages)
    if state.error:
        raise ConstraintError(field, f"{field}: cannot compile the {kind.replace('_', ' ')}: {state.error}")
    return c


class GrammarState:
    """One request's matcher over its committed answer tokens."""

    def __init__(self, constraint: Constraint):
        from llguidance import LLMatcher

        self.vocab = constraint.vocab
        self.limit = constraint.limit
        self._commits = 0      # tokens committed: the closing rule's answer holds until the next one
        self._closing = None   # (room, commits, answer) of the last closing() call
        self.matcher = LLMatcher(self.vocab.ll, constraint.grammar, log_level=0)
        self.mask_seconds = 0.0  # host time spent in the engine (masks, forced tokens, checks)

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""

    def allowed(self) -> np.ndarray:
        """bool [logit_width]: the tokens the grammar allows at the next position (stop ids only
        where the answer may end; ids past the tokenizer's vocabulary never)."""
        import time

        t = time.perf_counter()
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        out = np.zeros(self.vocab.logit_width, dtype=bool)
        n = self.vocab.vocab_size
        out[:n] = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
        self.mask_seconds += time.perf_counter() - t
        return out

    def accepts(self, token: int) -> bool:
        """Whether `token` may come next (without committing it)."""
        return self.matcher.validate_tokens([int(token)]) == 1

    def commit(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self._commits += 1

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (the forced bytes, tokenized), committed by the caller."""
        import time

        t = time.perf_counter()
        out = list(self.matcher.compute_ff_tokens())
        self.mask_seconds += time.perf_counter() - t
        return out

    def completion(self, limit: int) -> list[int] | None:
        """A short run of tokens that takes the committed prefix to an accepting state: forced
        tokens as the grammar forces them, otherwise the first allowed of the vocabulary's closers
        (else the lowest allowed id); None when none is found within `limit` tokens."""
        import time

        t = time.perf_counter()
        m, out = self.matcher.deep_copy(), []
        stops = set(self.vocab.stop_ids)
        while len(out) <= limit and not m.is_error():
            if m.is_accepting():
                self.mask_seconds += time.perf_counter() - t
                return out
            forced = list(m.compute_ff_tokens())
            if forced:
                m.consume_tokens(forced)
                out += forced
                continue
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            tok = next((c for c in self.vocab.closers if bits[c]), None)
            if tok is None:
                ids = [int(i) for i in np.flatnonzero(bits[:self.vocab.vocab_size]) if int(i) not in stops]
                if not ids:
                    break
                tok = ids[0]
            m.consume_token(tok)
            out.append(tok)
        self.mask_seconds += time.perf_counter() - t
        return None

    def room(self, gen_length: int, frontier: int) -> int:
        """Tokens the answer may still take at span position `frontier`."""
        return min(gen_length, self.limit or gen_length) - frontier

    def closing(self, room: int) -> tuple[int | None, int]:
        """The closing rule: (the only token the next position may take, or None; how many tokens
        may still be committed freely). When the shortest completion found needs all but
        CLOSING_MARGIN of the `room` left, the answer follows it, so an unbounded language (an
        integer, a free string, an open array) still ends valid inside the span; with no such
        completion it is left to the model (the answer may then end at `length`)."""
        last = self._closing
        if last is not None and last[:2] == (room, self._commits):
            return last[2]  # asked again of the same prefix (the step's read, then its mask)
        need = getattr(self, "_need", None)
        if need is not None and room > 2 * need + 4 * CLOSING_MARGIN:
            return None, room  # far from the end: the last estimate is enough
        run = self.completion(room)
        if run is None:
            answer = (None, room)
        else:
            self._need = len(run)
            free = room - len(run) - CLOSING_MARGIN
            answer = (run[0] if free <= 0 and run else None), max(free, 0)
        self._closing = (room, self._commits, answer)
        return answer

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """Nothing but a stop token can come next."""
        return self.matcher.is_stopped()
