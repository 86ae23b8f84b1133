"""Drafting only where it pays: a batch's choice between steps with and without draft rows.

Exact parallel decoding (`draft_depth`) never changes an id, so the number of sampler steps a
request needs is fixed; what drafting changes is how many of them one forward advances and what
that forward costs. On a GPU a forward's time is nearly flat in its rows and fewer forwards are
less time; on a CPU a forward's time grows with its tokens (a draft row without cache is one more
canvas) and the drafting stage adds its own work, so the same drafts can make a step slower per
step advanced. `DraftGate` measures it: the batch reports each step's wall seconds and the sampler
steps it advanced (every request's committed steps, accepted drafts included), and the gate keeps,
for each mode, the seconds per advanced step over its latest steps. It starts drafting (the
configured behaviour), probes the other mode for a few steps after a warm-up and then at growing
intervals, and switches when the other mode is cheaper by more than `margin`. While it says no,
the batch plans no draft rows and no drafting stage; requests keep their `draft_depth`, and the
next drafting step starts from no guesses (its first step only guesses, so it is not counted).

Only the plan changes: every step is the sampler's own, so ids, events and NFE are those of the
run with drafting always on. Forward counts do depend on the timings, which is why the checks that
count forwards (conformance `--draft-depth`, the drafting tests) run with the gate off.
"""

from __future__ import annotations

import time
from collections import deque


class DraftGate:
    """Whether the batch's next step may run draft rows, from the measured cost of each mode.

    `record(seconds, advanced)` after every step in which some request could draft; `drafting`
    is the mode the next step runs. The phases: a run of the preferred mode (`warmup` counted
    steps at first, then `interval` doubling up to `max_interval` while the comparison keeps the
    preferred mode, and at least as long as keeps a losing probe's extra cost under `overhead` of
    the time; back to `interval` when it switches), then a probe of the other mode
    (`probe` counted steps), then the comparison of the two modes' seconds per advanced step over
    their latest `window` steps."""

    def __init__(self, clock=time.perf_counter, warmup: int = 1, probe: int = 2, interval: int = 32,
                 max_interval: int = 2048, margin: float = 0.08, window: int = 6, start: bool = True,
                 overhead: float = 0.02):
        if (min(warmup, probe, interval, window) < 1 or max_interval < interval or not 0 <= margin < 1
                or not 0 < overhead <= 1):
            raise ValueError("warmup, probe, interval and window must be >= 1, max_interval >= "
                             "interval, 0 <= margin < 1, 0 < overhead <= 1")
        self.clock = clock
        self.probe, self.base_interval, self.max_interval = probe, interval, max_interval
        self.margin, self.overhead = margin, overhead
        self.drafting = start    # the mode the next step runs (`start`: the first phase's)
        self.preferred = start   # the mode the last comparison chose
        self.probing = False     # the current phase probes the other mode
        self.left = warmup       # counted steps left in the phase
        self.skip = int(start)   # steps not counted first (a drafting phase's first step only guesses)
        self.interval = interval
        self.samples = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self.switches = 0        # comparisons that changed the preferred mode
        self.steps = {True: 0, False: 0}  # steps recorded in each mode, counted or not

    def cost(self, drafting: bool) -> float | None:
        """Seconds per advanced step of a mode over its latest counted steps (None: none yet)."""
        s = self.samples[drafting]
        if not s:
            return None
        return sum(x for x, _ in s) / max(sum(a for _, a in s), 1)

    def record(self, seconds: float, advanced: int) -> None:
        """One step of the current mode took `seconds` and advanced `advanced` sampler steps."""
        self.steps[self.drafting] += 1
        if self.skip:
            self.skip -= 1
            return
        self.samples[self.drafting].append((seconds, advanced))
        self.left -= 1
        if self.left > 0:
            return
        if not self.probing:
            self._enter(not self.preferred, self.probe, probing=True)
            return
        other = not self.preferred
        mine, theirs = self.cost(self.preferred), self.cost(other)
        if mine is not None and theirs is not None and theirs < mine * (1 - self.margin):
            self.preferred, self.interval = other, self.base_interval
            self.switches += 1
        else:
            self.interval = min(max(2 * self.interval, self._affordable(mine, theirs)), self.max_interval)
        self._enter(self.preferred, self.interval, probing=False)

    def _affordable(self, mine: float | None, theirs: float | None) -> int:
        """Steps of the preferred mode after which the next probe costs at most `overhead` of the
        time (the probe just lost: it ran `probe` + 1 steps at theirs / mine of a step's cost)."""
        if not mine or theirs is None or theirs <= mine:
            return 0
        return int((self.probe + 1) * (theirs / mine - 1) / self.overhead) + 1

    def _enter(self, drafting: bool, steps: int, probing: bool) -> None:
        self.skip = 1 if drafting and not self.drafting else 0
        self.drafting, self.left, self.probing = drafting, steps, probing


def gate_for(adaptive: bool | None, device, draft_budget: int, start_drafting: bool = False) -> DraftGate | None:
    """The gate of a batch on `device`: `adaptive` True or False, or None for the default (on for
    a CPU, where a forward's time grows with its rows; off on CUDA, where it hardly does and the
    probes would only cost plain steps and extra graph buckets). No gate without a draft budget
    (no drafting: `--draft-budget 0`, tensor parallelism). On a CPU the gate starts plain and
    first tries drafting after 32 steps: a LLaDA drafting step there costs several plain ones (a
    draft row is a whole canvas, and the step leaves the host-planned path), so a fresh batch that
    started drafting paid its first probe in every short request (a 32-step request at batch 1:
    about 15% of its time); where drafting pays, the first probe finds it and the gate keeps it.
    `start_drafting` (LLaDA2.x block diffusion, whose draft is one block over the cached prefix)
    and `adaptive` on CUDA start drafting."""
    cpu = getattr(device, "type", str(device)) == "cpu"
    on = cpu if adaptive is None else bool(adaptive)
    if not on or draft_budget <= 0:
        return None
    return DraftGate(start=False, warmup=32) if cpu and not start_drafting else DraftGate()
