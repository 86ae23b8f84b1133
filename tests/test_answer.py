"""The stop-string holdback of answers (server/answer.py): `find_stop`, `stop_tail` and the deltas of a
`Choice`, which never take back text: streamed deltas concatenate to exactly the whole answer."""

from __future__ import annotations

import random

import pytest

from server.answer import BaseChoice, Choice, Decoder, find_stop, stop_tail
from server.infill import InfillChoice, split_infill

EOS = 0


class CharTokenizer:
    """Token i is one character (id 0: EOS, special; id 1: half of a two-token character)."""

    ALPHABET = "\x00\x01abcdEND xyz"

    def decode(self, ids, skip_special_tokens=True):
        out, i = [], 0
        ids = list(ids)
        while i < len(ids):
            t = ids[i]
            if t == 0:
                out.append("" if skip_special_tokens else "<eos>")
            elif t == 1:  # the first half of "é": alone it decodes to the replacement character
                if i + 1 < len(ids) and ids[i + 1] == 1:
                    out.append("é")
                    i += 1
                else:
                    out.append("\ufffd")
            else:
                out.append(self.ALPHABET[t])
            i += 1
        return "".join(out)


def ids_of(text: str) -> list[int]:
    return [CharTokenizer.ALPHABET.index(c) for c in text]


def choice(stops, max_tokens=64, skip_special=True) -> Choice:
    return Choice(0, Decoder(CharTokenizer(), skip_special=skip_special), [EOS], max_tokens, stops)


def stream(c: Choice, ids: list[int]) -> list[str]:
    """Feed each longer prefix, then the whole run: every delta in order."""
    deltas = [c.on_progress(ids[:k]) for k in range(1, len(ids) + 1)]
    return deltas + [c.on_done(ids)]


def test_find_stop_takes_the_match_that_ends_first_and_on_a_tie_the_longer():
    assert find_stop("abcENDxyz", ["END"]) == (3, "END")
    assert find_stop("abcENDxyz", ["xyz", "END"]) == (3, "END")     # END ends first
    assert find_stop("abcENDxyz", ["ND", "END"]) == (3, "END")      # same end: the longer match
    assert find_stop("abcENDxyz", ["Dx", "NDxyz"]) == (5, "Dx")     # Dx ends at 7, before NDxyz
    assert find_stop("abcENDxyzEND", ["END"], after=6) == (9, "END")  # a match ending by `after`: skipped
    assert find_stop("abcENDxyz", ["END"], after=5) == (3, "END")     # ends at 6, past 5
    assert find_stop("abc", ["END"]) is None
    assert find_stop("", ["END"]) is None


def test_stop_tail_is_the_longest_suffix_that_could_still_grow_into_a_stop():
    assert stop_tail("abcE", ["END"]) == 1
    assert stop_tail("abcEN", ["END"]) == 2
    assert stop_tail("abcEND", ["END"]) == 0  # a whole stop is a match, not a tail
    assert stop_tail("abc", ["END"]) == 0
    assert stop_tail("abxy", ["xyz", "bxyz"]) == 3
    assert stop_tail("", ["END"]) == 0


def test_a_possible_stop_is_held_back_until_it_cannot_be_one():
    c = choice(["END"])
    assert c.on_progress(ids_of("ab")) == "ab"
    assert c.on_progress(ids_of("abE")) == ""      # "E" could start END
    assert c.on_progress(ids_of("abEN")) == ""
    assert c.on_progress(ids_of("abENx")) == "ENx"  # it did not
    assert c.on_progress(ids_of("abENxEND")) == ""  # the stop: nothing past it is sent
    assert c.answer is not None and c.answer.text == "abENx" and c.answer.finish_reason == "stop"
    assert c.answer.ids == ids_of("abENx") and c.answer.completion_tokens == 5
    assert c.on_done(ids_of("abENxENDzz")) == ""    # nothing more once final


def test_a_half_decoded_character_is_held_back():
    c = choice([])
    assert c.on_progress(ids_of("ab") + [1]) == "ab"
    assert c.on_progress(ids_of("ab") + [1, 1]) == "é"


def test_the_eos_id_and_max_tokens_end_the_answer():
    c = choice(["END"], max_tokens=4)
    assert "".join(stream(c, ids_of("abcdxyz"))) == "abcd"
    assert c.answer.finish_reason == "length" and c.answer.ids == ids_of("abcd")
    c = choice(["END"])
    assert "".join(stream(c, ids_of("ab") + [EOS] + ids_of("cd"))) == "ab"
    assert c.answer.finish_reason == "stop"
    c = choice([], skip_special=False)  # a decoder that keeps special tokens keeps the EOS too
    assert "".join(stream(c, ids_of("ab") + [EOS])) == "ab<eos>"


def test_streamed_deltas_never_take_text_back_and_join_to_the_whole_answer():
    rng = random.Random(7)
    alphabet = ids_of("abcdEND xyz") + [1]
    for _ in range(300):
        ids = [rng.choice(alphabet + [EOS] * (rng.random() < 0.1)) for _ in range(rng.randint(0, 24))]
        stops = rng.choice([[], ["END"], ["EN", "ND x"], ["D x", "END"], ["xyz", "z"]])
        max_tokens = rng.randint(1, 30)
        streamed = choice(stops, max_tokens)
        sent = ""
        for k in range(1, len(ids) + 1):
            sent += streamed.on_progress(ids[:k])
            assert streamed.sent == sent  # what was sent stays sent
        sent += streamed.on_done(ids)
        whole = choice(stops, max_tokens)
        whole.on_done(ids)
        assert sent == streamed.answer.text == whole.answer.text, (ids, stops, max_tokens)
        a, b = streamed.answer, whole.answer
        assert (a.ids, a.completion_tokens) == (b.ids, b.completion_tokens)
        # Known difference: an answer cut at exactly max_tokens is "length" when streamed (the next id
        # is not known yet) and "stop" whole when the id after it is EOS.
        if len(b.ids) < max_tokens:
            assert a.finish_reason == b.finish_reason
        assert find_stop(whole.answer.text, stops) is None


@pytest.mark.parametrize("make", [
    lambda: choice(["END"]),
    lambda: InfillChoice(0, Decoder(CharTokenizer()), split_infill([2, 99, 99, 3], 99)),
])
def test_every_choice_kind_implements_the_whole_interface(make):
    c = make()
    assert isinstance(c, BaseChoice)
    assert (c.index, c.tokens, c.sent, c.answer) == (0, 0, "", None) and c.max_tokens >= 1
    assert c.on_progress([2]) in ("", "a")
    text = c.on_done([2, 3] if isinstance(c, InfillChoice) else [2, 3, EOS])
    assert c.answer is not None and c.answer.text.endswith(text) and isinstance(c.body_extra(), dict)
