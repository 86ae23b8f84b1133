"""The CPU intra-op thread count, chosen again and again while serving.

The server's start-up measurement (weights.checkpoint.measure_cpu_threads) times a few seconds of
forwards: when another process holds a core during those seconds, the forwards on every core collapse
at OpenMP's barriers and one thread wins, though the machine is quiet a minute later. Here the engine
keeps the decision open. Every batch step is timed (wall seconds) with its work (the query tokens the
step's forward processes), as seconds per query token. Every `interval_s` seconds of stepping the
engine tries the other count in a probe: `probe_steps` steps on it, alternating with as many on the
current count (alternating cancels the drift of the load and of the batch), and it switches when the
other's median is more than `margin` below the current's. A probe step more than `abort_ratio` times
slower than the current's ends the probe at once (a collapsed count costs one step, not several).

A probe that loses doubles the interval (up to 2**`max_backoff` times), and the interval is never
shorter than the last probe's extra seconds over `budget`: in a steady state at most about 2% of the
stepping time goes to probes, even when the other count collapses. A win resets the interval. When
the current count slows down by `slowdown` against its median at the last probe (a load arrived, or
the batch changed), the next probe does not wait for the backed-off interval.

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


class ThreadTuner:
    """The live thread policy of one engine thread. The engine calls `before_step()` right before a
    batch step and `after_step(tokens, seconds)` right after it; between steps the count is `current`."""

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
        self.losses = 0            # probes lost in a row (the backoff's exponent)
        self.stepped = 0.0         # stepping seconds since the last probe ended
        self.probe_cost = 0.0      # the last probe's extra seconds
        self.reference = None      # the current count's seconds per token at the last probe
        self.recent = deque(maxlen=9)  # seconds per token of the latest steps outside probes
        self.probe: Probe | None = None
        self.probes = 0
        self.switches = 0
        self.applied = None        # the count last handed to set_threads
        self._next = 0             # round robin over the other candidates

    # ------------------------------------------------------------------ the engine's hooks
    def before_step(self) -> int:
        """Set the count the coming step runs on (a probe's, or the current one); returns it."""
        if self.probe is None and self._due():
            self._begin()
        n = self.current if self.probe is None else self.probe.plan[self.probe.at]
        self._apply(n)
        return n

    def after_step(self, tokens: int, seconds: float) -> None:
        """Record the step just run (`tokens` query tokens in `seconds`); back to the current count."""
        n = self.applied
        self._apply(self.current)
        if tokens <= 0 or seconds <= 0:  # nothing to learn from (a probe repeats the slot)
            return
        p = self.probe
        if p is None:
            self.stepped += seconds
            self.recent.append(seconds / tokens)
            return
        p.add(n, tokens, seconds)
        if n == p.other and p.cost.get(p.current) and \
                p.cost[n][-1] > self.abort_ratio * statistics.median(p.cost[p.current]):
            self._end(p)  # the other count collapses: no more steps on it
        elif p.at >= len(p.plan):
            self._end(p)

    def interval(self) -> float:
        """Stepping seconds from one probe to the next, as things stand."""
        backoff = self.interval_s * 2 ** min(self.losses, self.max_backoff)
        return max(backoff, self.probe_cost / self.budget)

    # ------------------------------------------------------------------ the policy
    def _apply(self, n: int) -> None:
        if n != self.applied:
            self.set_threads(n)
            self.applied = n

    def _due(self) -> bool:
        if self.stepped >= self.interval():
            return True
        if self.reference is None or self.stepped < max(self.interval_s, self.probe_cost / self.budget) \
                or len(self.recent) < self.recent.maxlen:
            return False
        return statistics.median(self.recent) > self.slowdown * self.reference  # the current count slowed

    def _begin(self) -> None:
        others = [c for c in self.candidates if c != self.current]
        other = others[self._next % len(others)]
        self._next += 1
        plan = [self.current, other] * self.probe_steps
        self.probe = Probe(self.current, other, plan)
        self.probes += 1

    def _end(self, p: Probe) -> None:
        self.probe = None
        self.stepped = 0.0
        self.recent.clear()
        self.probe_cost = p.extra_seconds()
        mine = statistics.median(p.cost[p.current])
        theirs = statistics.median(p.cost[p.other])
        if theirs < (1.0 - self.margin) * mine:
            self.current, self.losses, self.reference = p.other, 0, theirs
            self.switches += 1
            self._apply(self.current)
            log.info("CPU threads: while serving, a query token takes %.4f ms on %d thread%s, %.4f ms on %d "
                     "(median of %d and %d steps); using %d", mine * 1e3, p.current,
                     "" if p.current == 1 else "s", theirs * 1e3, p.other, len(p.cost[p.current]),
                     len(p.cost[p.other]), p.other)
            if self.on_switch is not None:
                self.on_switch(p.current, p.other)
        else:
            self.losses += 1
            self.reference = mine
            log.debug("CPU threads: kept %d (%.4f ms per query token; %d: %.4f ms); next try in %.1f s of "
                      "stepping", p.current, mine * 1e3, p.other, theirs * 1e3, self.interval())
