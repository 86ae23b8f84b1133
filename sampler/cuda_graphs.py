"""CUDA graphs of the device step, one per bucket, replayed with the plan copied into a static buffer.

`sampler.device_step` launches the same kernels with the same shapes every time for a bucket and
never reads a value back to the host, so a step can be captured once and replayed: one launch
instead of the hundreds an eager 32-layer forward plus selection makes. Each graph reads its plan
from a static buffer (the host copies the real plan in before the replay) and writes its outputs
to static tensors that stay valid until the next replay of any graph (the engine copies them to
pinned memory right after).

Capture runs the step twice first on a side stream with an all-padding plan (every request row
points at the dummy slot, so nothing is committed and only the scratch rows are written): Triton
compiles and autotunes in the first run; the second runs inside `kernels.launch.capture_launches()`,
exactly the launch path the capture takes (the stored choice, no tuning), so the capture loads no
module (which a capturing stream refuses). All graphs share one memory pool; their intermediates
are reused between graphs, since only one replays at a time.

Counters: `replays` (steps replayed from a graph), `eager_steps` (steps run eagerly because their
bucket was never to be captured: too large, or past `max_graphs`) and `refused_steps` (steps run
eagerly because their bucket's capture failed), so a benchmark can show that a "graphs" figure is
one. The step function is held weakly when it is a bound method (the batch's own step): the batch
and its graphs would otherwise be a reference cycle, and the KV buffers and the graph pool would
outlive the batch until a full garbage collection.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

from kernels.launch import capture_launches

log = logging.getLogger("llada.graphs")


class StepGraphs:
    """Captured steps keyed by bucket; buckets over `max_tokens` or past `max_graphs` run eagerly."""

    def __init__(self, step_fn, dummy_slot: int, device, max_tokens: int = 8192, max_graphs: int = 64):
        # A bound method is held through a weak reference (see the module's docstring).
        self._step_ref = weakref.WeakMethod(step_fn) if hasattr(step_fn, "__self__") else None
        self._step_fn = None if self._step_ref is not None else step_fn
        self.dummy_slot = dummy_slot
        self.device = device
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.graphs: dict = {}
        self.refused: set = set()   # buckets whose capture failed: they run eagerly
        self.pool = None
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.eager_steps = 0
        self.refused_steps = 0
        self.replays = 0

    @property
    def step_fn(self):
        if self._step_ref is None:
            return self._step_fn
        fn = self._step_ref()
        if fn is None:
            raise RuntimeError("the batch these graphs belong to is gone")
        return fn

    def counts(self) -> dict:
        """Steps replayed from a graph, run eagerly by design, and run eagerly after a refused capture."""
        return dict(replayed=self.replays, eager=self.eager_steps, refused=self.refused_steps)

    def _idle_plan(self, bucket) -> torch.Tensor:
        from sampler.device_step import idle_plan
        return idle_plan(bucket.requests + 1, self.dummy_slot, self.device)

    def capturable(self, bucket) -> bool:
        return (bucket.tokens <= self.max_tokens and len(self.graphs) < self.max_graphs
                and bucket not in self.refused)

    def capture(self, bucket):
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        plan = self._idle_plan(bucket)
        step = self.step_fn
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step(plan, bucket)  # compiles and autotunes
            with capture_launches():  # the capture's own launch path, outside the capture
                step(plan, bucket)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = step(plan, bucket)
        finally:
            # A capture that raises can leave its capture stream current (torch.cuda.graph's exit
            # ends the capture before it restores the stream, and ending a broken capture raises).
            torch.cuda.set_stream(current)
        torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        used = max(0, free0 - torch.cuda.mem_get_info(self.device)[0])
        self.capture_seconds += dt
        self.capture_bytes += used
        self.graphs[bucket] = (graph, plan, outputs)
        log.info("captured a step graph for %s in %.2f s (%.1f MiB)", bucket, dt, used / 2**20)
        return self.graphs[bucket]

    def warm(self, buckets) -> None:
        """Capture these buckets now (at start, so that serving never waits for a capture)."""
        t0 = time.perf_counter()
        for b in buckets:
            if b not in self.graphs and self.capturable(b):
                self.capture(b)
        log.info("CUDA graphs: %d captured in %.1f s, %.0f MiB of device memory",
                 len(self.graphs), time.perf_counter() - t0, self.capture_bytes / 2**20)

    def run(self, bucket, plan):
        entry = self.graphs.get(bucket)
        if entry is None and self.capturable(bucket):
            try:
                entry = self.capture(bucket)
            except RuntimeError as e:  # an operation that cannot be captured: stay eager for it
                log.warning("could not capture a step graph for %s (%s); running it eagerly",
                            bucket, e)
                self.refused.add(bucket)
                torch.cuda.synchronize(self.device)
        if entry is None:
            if bucket in self.refused:
                self.refused_steps += 1
            else:
                self.eager_steps += 1
            return self.step_fn(plan, bucket)
        graph, static_plan, outputs = entry
        static_plan.copy_(plan, non_blocking=True)
        graph.replay()
        self.replays += 1
        return outputs
