"""The CPU intra-op thread count, chosen again and again while serving.

The server's start-up measurement (weights.checkpoint.measure_cpu_threads) times a few seconds of
forwards: when another process holds a core during those seconds, the forwards on every core collapse
at OpenMP's barriers and one thread wins, though the machine is quiet a minute later. Here the engine
keeps the decision open. Every batch step is timed (wall seconds) with its work (the query tokens the
step's forward processes), as seconds per query token.

The better count depends on the step's size (one request's 48-token step gains nothing from a second
core that a 16-request step gains much from), so steps are grouped by size, in powers of two of their
query tokens, and each size keeps its own count (a size seen for the first time starts from the
nearest size's). After `interval_s` / 4 seconds of stepping at a size (the inherited count is a
guess), then every `interval_s`, the engine tries the other count there in a probe: `probe_steps` steps on it, alternating with as many on the current count
(alternating cancels the drift of the load and of the batch), and it switches when the other's median
is more than `margin` below the current's. A probe step more than `abort_ratio` times slower than the
current's ends the probe at once (a collapsed count costs one step, not several).

A probe that loses doubles the size's interval (up to 2**`max_backoff` times), and the interval is
never shorter than the last probe's extra seconds over `budget`: in a steady state at most about 2% of
the stepping time goes to probes, even when the other count collapses. A win resets the interval.
When the current count slows down by `slowdown` against its median at the last probe (a load
arrived), the next probe does not wait for the backed-off interval.

Only the thread count changes, so only the order of floating-point reductions can; the sampler's
rules are untouched. The policy keeps no clock: the engine reports each step's seconds, so tests
drive it with made-up costs.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("llada.engine")


@dataclass
class Probe:
    """One try of `other` against `current`: the count of each step, and what each count took."""

    current: int
    other: int
    plan: list
    at: int = 0
    cost: dict = field(default_factory=dict)      # count -> [seconds per query token] per step
    seconds: dict = field(default_factory=dict)   # count -> total step seconds
    tokens: dict = field(default_factory=dict)    # count -> total query tokens

    def add(self, n: int, tokens: int, seconds: float) -> None:
        self.cost.setdefault(n, []).append(seconds / tokens)
        self.seconds[n] = self.seconds.get(n, 0.0) + seconds
        self.tokens[n] = self.tokens.get(n, 0) + tokens
        self.at += 1

    def extra_seconds(self) -> float:
        """What the steps on `other` took beyond the current count's rate for the same tokens."""
        if not self.tokens.get(self.other) or not self.tokens.get(self.current):
            return 0.0
        rate = self.seconds[self.current] / self.tokens[self.current]
        return max(0.0, self.seconds[self.other] - rate * self.tokens[self.other])


@dataclass
class Size:
    """The policy's state for the steps of one size (query tokens in [2**k, 2**(k+1)))."""

    current: int
    losses: int = 0               # probes lost in a row (the backoff's exponent)
    stepped: float = 0.0          # stepping seconds since the last probe ended
    probe_cost: float = 0.0       # the last probe's extra seconds
    reference: float | None = None  # the current count's seconds per token at the last probe
    recent: deque = field(default_factory=lambda: deque(maxlen=9))  # latest steps outside probes
    probe: Probe | None = None
    tries: int = 0                # probes begun (round robin over the other counts)


def size_of(tokens: int) -> int:
    """The size class of a step of `tokens` query tokens: k with 2**k <= tokens < 2**(k+1)."""
    return max(1, tokens).bit_length() - 1


class ThreadTuner:
    """The live thread policy of one engine thread. The engine calls `before_step(tokens)` right
    before a batch step of `tokens` query tokens and `after_step(seconds)` right after it; between
    steps the count is `current`, the count of the size last stepped."""

    def __init__(self, candidates, current: int, set_threads: Callable[[int], None], *,
                 interval_s: float = 2.0, probe_steps: int = 3, margin: float = 0.10,
                 abort_ratio: float = 2.0, budget: float = 0.02, max_backoff: int = 5,
                 slowdown: float = 1.5, on_switch: Callable | None = None):
        self.candidates = tuple(dict.fromkeys(int(c) for c in candidates))
        if len(self.candidates) < 2:
            raise ValueError("a live thread policy needs at least two counts to choose between")
        self.start = self.current = int(current)
        self.set_threads = set_threads
        self.interval_s, self.probe_steps, self.margin = interval_s, probe_steps, margin
        self.abort_ratio, self.budget, self.max_backoff = abort_ratio, budget, max_backoff
        self.slowdown = slowdown
        self.on_switch = on_switch
        self.sizes: dict[int, Size] = {}
        self.probes = 0
        self.switches = 0
        self.applied = None        # the count last handed to set_threads
        self._step = None          # (size, tokens) of the step under way

    # ------------------------------------------------------------------ the engine's hooks
    def before_step(self, tokens: int) -> int:
        """Set the count the coming step of `tokens` query tokens runs on; returns it."""
        k = size_of(tokens)
        s = self.sizes.get(k) or self._new_size(k)
        if s.probe is None and tokens > 0 and self._due(s):
            self._begin(s)
        n = s.current if s.probe is None else s.probe.plan[s.probe.at]
        self._step = (k, tokens)
        self._apply(n)
        return n

    def after_step(self, seconds: float) -> None:
        """Record the step just run (`seconds` of wall time); back to its size's current count."""
        n, (k, tokens) = self.applied, self._step
        s = self.sizes[k]
        self.current = s.current
        self._apply(s.current)
        if tokens <= 0 or seconds <= 0:  # nothing to learn from (a probe repeats the slot)
            return
        p = s.probe
        if p is None:
            s.stepped += seconds
            s.recent.append(seconds / tokens)
            return
        p.add(n, tokens, seconds)
        if n == p.other and p.cost.get(p.current) and \
                p.cost[n][-1] > self.abort_ratio * statistics.median(p.cost[p.current]):
            self._end(k, s)  # the other count collapses: no more steps on it
        elif p.at >= len(p.plan):
            self._end(k, s)

    def interval(self, s: Size) -> float:
        """Stepping seconds at size `s` from one probe to the next, as things stand."""
        if s.tries == 0:  # the first try at a size comes soon: its count was inherited
            return self.interval_s / 4
        backoff = self.interval_s * 2 ** min(s.losses, self.max_backoff)
        return max(backoff, s.probe_cost / self.budget)

    def size(self, tokens: int) -> Size | None:
        return self.sizes.get(size_of(tokens))

    # ------------------------------------------------------------------ the policy
    def _apply(self, n: int) -> None:
        if n != self.applied:
            self.set_threads(n)
            self.applied = n

    def _new_size(self, k: int) -> Size:
        """A size seen for the first time starts on the count of the nearest size seen."""
        near = min(self.sizes, key=lambda j: (abs(j - k), j), default=None)
        s = self.sizes[k] = Size(self.start if near is None else self.sizes[near].current)
        return s

    def _due(self, s: Size) -> bool:
        if s.stepped >= self.interval(s):
            return True
        if s.reference is None or s.stepped < max(self.interval_s, s.probe_cost / self.budget) \
                or len(s.recent) < s.recent.maxlen:
            return False
        return statistics.median(s.recent) > self.slowdown * s.reference  # the current count slowed

    def _begin(self, s: Size) -> None:
        others = [c for c in self.candidates if c != s.current]
        other = others[s.tries % len(others)]
        s.tries += 1
        s.probe = Probe(s.current, other, [s.current, other] * self.probe_steps)
        self.probes += 1

    def _end(self, k: int, s: Size) -> None:
        p, s.probe = s.probe, None
        s.stepped = 0.0
        s.recent.clear()
        s.probe_cost = p.extra_seconds()
        mine = statistics.median(p.cost[p.current])
        theirs = statistics.median(p.cost[p.other])
        if theirs < (1.0 - self.margin) * mine:
            s.current, s.losses, s.reference = p.other, 0, theirs
            self.current = p.other
            self.switches += 1
            self._apply(p.other)
            log.info("CPU threads: while serving, at %d-%d query tokens a step takes %.4f ms per token on %d "
                     "thread%s, %.4f ms on %d (median of %d and %d steps); using %d", 2 ** k, 2 ** (k + 1) - 1,
                     mine * 1e3, p.current, "" if p.current == 1 else "s", theirs * 1e3, p.other,
                     len(p.cost[p.current]), len(p.cost[p.other]), p.other)
            if self.on_switch is not None:
                self.on_switch(p.current, p.other)
        else:
            s.losses += 1
            s.reference = mine
            log.debug("CPU threads: at %d-%d query tokens kept %d (%.4f ms per token; %d: %.4f ms); next try "
                      "in %.1f s of stepping", 2 ** k, 2 ** (k + 1) - 1, p.current, mine * 1e3, p.other,
                      theirs * 1e3, self.interval(s))
