"""Fair admission: which waiting sub-request joins the batch next.

A request asking for n choices (or several prompts) becomes several sub-requests that wait together.
First come first served would let a few such requests hold every batch slot while single-choice
requests behind them wait for minutes. Instead the queue groups waiting sub-requests by request and
admits from the request with the fewest sub-requests running (max-min fairness: every request gets
an equal share of the batch when several compete), breaking ties by the request served least
recently (round-robin; a request that just arrived counts as served at its arrival). A lone request
still gets the whole batch, and separate single-choice requests keep their arrival order.

A request may carry a priority (an integer, 0 by default; lower is sooner, as in vLLM): a waiting
request of a lower priority value is always admitted before any of a higher one, and the rule above
orders requests of equal priority. Priority orders admission only: a running request is never
preempted.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Group:
    waiting: collections.deque = field(default_factory=collections.deque)
    running: int = 0
    served: int = 0   # tick of the last admission (of the arrival before the first)
    priority: int = 0  # lower is admitted sooner


class FairQueue:
    """Waiting sub-requests keyed by their request (`group`); not thread safe (the engine locks)."""

    def __init__(self):
        self._groups: dict[object, _Group] = {}
        self._tick = itertools.count()
        self._waiting = 0

    def __len__(self) -> int:
        return self._waiting

    def __iter__(self):
        for g in list(self._groups.values()):
            yield from list(g.waiting)

    def push(self, group, items, priority: int = 0) -> None:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(served=next(self._tick), priority=priority)
        g.waiting.extend(items)
        self._waiting += len(items)

    def peek(self):
        """(group, item) to admit next, or None when nothing waits."""
        best, best_key = None, None
        for key, g in self._groups.items():
            if g.waiting and (best is None or (g.priority, g.running, g.served) < best_key):
                best, best_key = key, (g.priority, g.running, g.served)
        return None if best is None else (best, self._groups[best].waiting[0])

    def admitted(self, group, item) -> None:
        """`item` (the head of its group) joins the batch: it counts as running until `finished`."""
        g = self._groups[group]
        g.waiting.remove(item)
        self._waiting -= 1
        g.running += 1
        g.served = next(self._tick)

    def remove(self, group, item) -> None:
        """A waiting item leaves without running (cancelled, timed out, refused)."""
        g = self._groups[group]
        g.waiting.remove(item)
        self._waiting -= 1
        self._forget_if_empty(group, g)

    def finished(self, group) -> None:
        """A running item of `group` left the batch."""
        g = self._groups.get(group)
        if g is not None:
            g.running = max(0, g.running - 1)
            self._forget_if_empty(group, g)

    def clear(self) -> list:
        """Every waiting item (the queue keeps the running counts)."""
        items = list(self)
        for key, g in list(self._groups.items()):
            g.waiting.clear()
            self._forget_if_empty(key, g)
        self._waiting = 0
        return items

    def _forget_if_empty(self, key, g: _Group) -> None:
        if not g.waiting and g.running == 0:
            del self._groups[key]
