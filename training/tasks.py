"""Deterministic instruction tasks for the embedded default model.

Every example is produced by this file from a seed: no byte of training or evaluation data comes
from anywhere else. Each task draws a *content key* (the list of letters, the pair of numbers, ...)
and renders it with one of several phrasings. Whether a key belongs to the held-out split is a pure
function of (task name, key) -- a hash -- so the training stream and the held-out set can never
share a problem, whatever the phrasing or the seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
HELD_OUT_PER_MILLE = 60  # about 6% of content keys are held out


@dataclass(frozen=True)
class Example:
    task: str
    key: str  # canonical content key (decides the split)
    prompt: str
    answer: str


def is_held_out(task: str, key: str) -> bool:
    digest = hashlib.sha256(f"{task}|{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def _letters(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> list[str]:
    n = rng.randint(lo, hi)
    if distinct:
        return rng.sample(LETTERS, n)
    return [rng.choice(LETTERS) for _ in range(n)]


def _join(xs) -> str:
    return " ".join(str(x) for x in xs)


# ---- task definitions: each returns (key, prompt, answer) ------------------------------------

def _copy(rng):
    xs = _letters(rng, 3, 6, distinct=True)
    p = rng.choice(["Repeat the list: {}", "Copy: {}"])
    return _join(xs), p.format(_join(xs)), _join(xs)


def _reverse(rng):
    xs = _letters(rng, 3, 6, distinct=True)
    p = rng.choice(["Reverse the list: {}", "Reverse: {}"])
    return _join(xs), p.format(_join(xs)), _join(reversed(xs))


def _sort(rng):
    xs = _letters(rng, 3, 5, distinct=True)
    p = rng.choice(["Sort the list: {}", "Sort: {}"])
    return _join(xs), p.format(_join(xs)), _join(sorted(xs))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    if rng.random() < 0.5:
        a, b = b, a
    p = rng.choice(["What is {} + {}?", "{} + {} ="])
    return f"{a}+{b}", p.format(a, b), str(a + b)


def _count(rng):
    xs = _letters(rng, 1, 8)
    p = rng.choice(["How many letters are in: {}?", "Count the letters: {}"])
    return _join(xs), p.format(_join(xs)), str(len(xs))


def _last(rng):
    xs = _letters(rng, 2, 6)
    if rng.random() < 0.5:
        p = rng.choice(["What is the first letter of: {}?", "First item of: {}"])
        return "first:" + _join(xs), p.format(_join(xs)), xs[0]
    p = rng.choice(["What is the last letter of: {}?", "Last item of: {}"])
    return "last:" + _join(xs), p.format(_join(xs)), xs[-1]


def _alphabet(rng):
    """A run of consecutive letters; in the gap phrasing some inner letters are shown as `_`.
    The answer is always the whole run, so the same model fills gaps left in an answer canvas
    (the infill API) and answers the spelled-out request."""
    n = rng.randint(4, 8)
    start = rng.randint(0, len(LETTERS) - n)
    run = list(LETTERS[start:start + n])
    key = f"{run[0]}-{run[-1]}"
    if rng.random() < 0.5:
        p = rng.choice(["Letters from {} to {}", "Write the letters from {} to {}"])
        return key, p.format(run[0], run[-1]), _join(run)
    shown = [c if i in (0, n - 1) or rng.random() < 0.5 else "_" for i, c in enumerate(run)]
    return key, "Fill the gaps: " + _join(shown), _join(run)


_GREETINGS = ["Hello", "Hi", "Hey", "Good morning", "Good evening", "Hello there", "Hi there"]
_ASKS = [
    ("Who are you?", "I am a tiny LLaDA model. I can copy, reverse and sort lists, and add numbers."),
    ("What can you do?", "I can copy, reverse and sort lists of letters, count them, "
                         "and add small numbers."),
    ("What is your name?", "I am the default model of llada-serve."),
    ("How do you work?", "I am a diffusion model: I start from masks and fill in the answer."),
]


def _chat(rng):
    g = rng.choice(_GREETINGS)
    punct = rng.choice(["!", ".", "", ","])
    if rng.random() < 0.4:
        return f"greet:{g}{punct}", f"{g}{punct}".strip(","), \
            "Hello! Ask me to sort, reverse or copy a list, or to add two numbers."
    q, a = rng.choice(_ASKS)
    if rng.random() < 0.5:
        return f"ask:{q}", q, a
    return f"ask:{g}{punct} {q}", f"{g}{punct} {q}", a


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], tuple[str, str, str]]
    weight: float
    evaluate: bool = True  # part of the held-out accuracy table


TASKS: list[Task] = [
    Task("copy", _copy, 1.0),
    Task("reverse", _reverse, 1.0),
    Task("sort", _sort, 1.5),
    Task("add", _add, 2.0),
    Task("count", _count, 0.7),
    Task("first_last", _last, 1.0),
    Task("alphabet", _alphabet, 2.5),
    # a handful of fixed replies so a first-time user's greeting gets a sensible answer
    Task("chat", _chat, 0.3, evaluate=False),
]


class TaskSet:
    def __init__(self, tasks: list[Task] | None = None):
        self.tasks = list(tasks or TASKS)
        self.by_name = {t.name: t for t in self.tasks}

    def sample_task(self, task: Task, rng: random.Random, split: str) -> Example:
        want_held = split == "heldout"
        for _ in range(10_000):
            key, prompt, answer = task.make(rng)
            held = is_held_out(task.name, key)
            if task.name == "chat" and not want_held:
                held = False  # the fixed replies are trained on, never evaluated
            if held == want_held:
                return Example(task.name, key, prompt, answer)
        raise RuntimeError(f"could not draw a {split} example of {task.name}")

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        task = rng.choices(self.tasks, weights=[t.weight for t in self.tasks])[0]
        return self.sample_task(task, rng, split)

    def stream(self, seed: int, split: str = "train"):
        rng = random.Random(seed)
        while True:
            yield self.sample(rng, split)

    def heldout(self, per_task: int, seed: int = 1234) -> dict[str, list[Example]]:
        """`per_task` distinct held-out problems per evaluated task (deterministic)."""
        out: dict[str, list[Example]] = {}
        for task in self.tasks:
            if not task.evaluate:
                continue
            rng = random.Random(f"{seed}:{task.name}")
            seen: set[str] = set()
            exs: list[Example] = []
            for _ in range(per_task * 200):
                ex = self.sample_task(task, rng, "heldout")
                if ex.key in seen:
                    continue
                seen.add(ex.key)
                exs.append(ex)
                if len(exs) == per_task:
                    break
            out[task.name] = exs
        return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="print a few generated examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--split", default="train", choices=["train", "heldout"])
    args = ap.parse_args()
    for i, ex in zip(range(args.n), TaskSet().stream(args.seed, args.split)):
        print(f"[{ex.task}] {ex.prompt!r} -> {ex.answer!r}")
