"""Structured output fields of a request -> the engine's compiled constraint.

Fields (completions and chat): `response_format` ({"type": "text"}, {"type": "json_object"},
{"type": "json_schema", "json_schema": {"schema": {...}, "name": ..., "strict": ...}}) and vLLM's
`guided_json` (a schema, object or JSON text), `guided_regex`, `guided_choice` (a list of
strings), `guided_grammar` (Lark or GBNF) and `structured_outputs` (vLLM's object with one of
`json`, `regex`, `choice`, `grammar`, `json_object`). At most one of them may ask for structure. The constraint is compiled once per distinct
(kind, value) by `sampler.constraint` (cached) and handed to the engine in `SamplingParams`;
anything wrong is a 400 naming the field.
"""

from __future__ import annotations

import json
from functools import lru_cache

from sampler.constraint import ConstraintError, Constraint, GrammarVocab, compile_constraint
from server.errors import ApiError

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "structured_outputs")
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                      "json_object": "json_object"}
CACHE_SIZE = 256


_bad = ApiError.bad_field  # a 400 naming the field


def requested(req) -> tuple[str, str, object] | None:
    """(field, kind, value) of the request's structured-output field, or None. Refuses two at once
    and malformed `response_format` objects."""
    found = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", "json_object", None))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise _bad("response_format", "response_format json_schema needs "
                           "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
            found.append(("response_format", "json_schema", js["schema"]))
        elif kind != "text":
            raise _bad("response_format", f"response_format type must be text, json_object or json_schema, "
                       f"got {json.dumps(kind)[:64]}")
    for field, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                        ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, field, None)
        if value is not None:
            found.append((field, kind, value))
    so = getattr(req, "structured_outputs", None)
    for key, value in (so or {}).items():
        field = f"structured_outputs.{key}"
        if key not in STRUCTURED_OUTPUTS:
            raise _bad(field, f"{field} is not supported; structured_outputs takes one of "
                       f"{', '.join(STRUCTURED_OUTPUTS)}")
        if value is None or (key == "json_object" and value is False):
            continue
        if key == "json_object" and value is not True:
            raise _bad(field, f"{field} must be true or false")
        found.append((field, STRUCTURED_OUTPUTS[key], None if key == "json_object" else value))
    if len(found) > 1:
        raise _bad(found[1][0], f"{found[1][0]} cannot be combined with {found[0][0]}: send one "
                   "structured-output field")
    return found[0] if found else None


@lru_cache(maxsize=CACHE_SIZE)
def _compiled(vocab: GrammarVocab, field: str, kind: str, text: str) -> Constraint:
    spec = None if kind == "json_object" else json.loads(text)
    return compile_constraint(kind, spec, vocab, field=field)


def request_constraint(svc, req) -> Constraint | None:
    """The compiled constraint of a request (None without one); ApiError 400 naming the field."""
    asked = requested(req)
    if asked is None:
        return None
    field, kind, value = asked
    if getattr(req, "suffix", None) is not None or getattr(req, "infill", None):
        raise _bad(field, f"{field} cannot be combined with suffix or infill")
    try:
        vocab = GrammarVocab.of(svc.bundle)
        # key order kept: it is the order of the answer's properties
        return _compiled(vocab, field, kind, json.dumps(value))
    except ConstraintError as e:
        raise _bad(field, str(e)) from None
    except (TypeError, ValueError) as e:  # a value JSON cannot carry (never from a parsed body)
        raise _bad(field, f"{field}: {e}") from None
