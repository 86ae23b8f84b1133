"""The engine: one thread owns the model and a batch and runs continuous batching.

Requests wait in a fair queue (sampler/fair_queue.py: the sub-requests of one HTTP request wait as a
group; the group with the fewest running, then the one served least recently, goes next) and join the
running batch at step boundaries while the batch has a free slot and room for their canvas
(`max_batch_size`, `max_batch_tokens`).
Every loop iteration is one `Batch.step()`: one forward for all running requests, each at
its own point in its own schedule. A request leaves the batch the moment it is finished, cancelled,
timed out, or (optionally) as soon as its answer can no longer change.

The engine talks to its callers through a `sink` per request: a callable that the engine thread
calls with one item at a time (`("step", StepEvent)`, `("progress", final_prefix_ids)`,
`("done", Result)` or `("error", EngineError)`). An asyncio server wraps it with
`loop.call_soon_threadsafe`; a plain thread can pass `queue.Queue.put`.

Likelihood scoring (`submit_score`, see sampler/likelihood.py) shares the loop: each iteration
that has scoring work also runs one packed forward over as many waiting scoring canvases (of any
number of requests) as fit `max_batch_tokens`, and a scoring request's sink gets
`("done", [PairScore])` or `("error", EngineError)`.

Early completion: tokens are never remasked once unmasked, so the contiguous run of unmasked
positions at the start of the generated span (the "final prefix") never changes again. When that
prefix holds a stop id (EOS/EoT) or reaches the answer's token limit, the answer is final and the
request can leave the batch without changing its output.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sampler.batch import CapacityError
from sampler.events import StepEvent
from sampler.fair_queue import FairQueue
from sampler.likelihood import ScoreBatch, ScoreJob
from sampler.engine_config import EngineConfig
from sampler.params import ParamError, SamplingParams
from sampler.runner import STOP, lead
from sampler.strategies import make_batch, rows_needed
from sampler.thread_tuner import ThreadTuner

log = logging.getLogger("llada.engine")


class EngineError(Exception):
    """A request the engine could not serve. The subclass says why; `code` is a finer reason
    (`step_failed`, `no_progress`) and `param` the request field at fault, when there is one. The
    engine knows no HTTP: server/errors.py maps each subclass onto a status."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class RequestTooLarge(EngineError):
    """The request's canvas can never fit the batch (`max_batch_tokens`)."""


class InvalidRequest(EngineError):
    """Parameters the batch refused when the request was admitted."""


class QueueFull(EngineError):
    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after


class EngineStopped(EngineError):
    def __init__(self, message: str = "the server is shutting down and accepts no new requests"):
        super().__init__(message, code="shutting_down")


class RequestTimeout(EngineError):
    def __init__(self, message: str):
        super().__init__(message, code="timeout")


class OutOfMemory(EngineError):
    def __init__(self, message: str):
        super().__init__(message, code="out_of_memory")


class RankFailed(EngineError):
    """Tensor parallel: a rank failed or is gone; no step can run again."""

    def __init__(self, message: str):
        super().__init__(message, code="rank_failed")


class InternalError(EngineError):
    """The engine failed while running the request (a bug or a device failure)."""


def check_fits(prompt_len: int, params: SamplingParams, max_batch_tokens: int, block_diffusion: bool) -> None:
    """The one request-fit rule: the canvas rows it needs against `max_batch_tokens`
    (RequestTooLarge names max_tokens)."""
    rows = rows_needed(prompt_len, params, block_diffusion)
    if rows > max_batch_tokens:
        raise RequestTooLarge(
            f"the request needs {rows} canvas tokens (prompt {prompt_len} + gen_length "
            f"{params.gen_length}{', doubled by cfg_scale' if params.cfg_scale > 0 else ''}); "
            f"this server's max_batch_tokens is {max_batch_tokens}", param="max_tokens")


@dataclass
class Result:
    gen_ids: list[int]        # the generated span (mask ids where a request left early)
    nfe: int
    steps: int
    early: bool               # left the batch before its schedule ended
    queued_s: float           # submission -> admission
    duration_s: float         # submission -> completion
    first_block_s: float | None
    forwards: int = 0         # forwards it took part in (fewer than nfe when drafts were accepted)
    # With params.logprobs set: per generated position, (step that committed it, its log-probability
    # in that step, [(token, log-probability)] alternatives); None where nothing was committed.
    token_info: list | None = None


@dataclass(eq=False)
class Handle:
    """One request inside the engine (a sub-request when the client asked for n > 1)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable
    want_steps: bool = False       # deliver every StepEvent
    want_progress: bool = False    # deliver the final prefix whenever it grows
    answer_limit: int | None = None  # tokens the answer is cut at (early completion)
    suffix_ids: list = field(default_factory=list)  # fixed context after the generated span
    span_ids: list | None = None   # infill: the span with mask ids where tokens are filled
    stop_ids: frozenset | None = None  # ids that end the answer (None: the model's EOS/EoT)
    stop_from: int = 0             # a stop id before this span position ends nothing (min_tokens)
    priority: int = 0              # lower is admitted sooner (sampler.fair_queue)
    rid: int = 0
    group: int = 0                 # the handles submitted together (one HTTP request) share it
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    deadline: float | None = None
    first_block_s: float | None = None
    first_token_seen: bool = False
    canvas: list = field(default_factory=list)
    prefix: int = 0
    steps: int = 0
    nfe: int = 0
    forwards: int = 0
    done: bool = False
    cancelled: bool = False
    stop_seen: bool = False
    token_info: list | None = None

    @property
    def infill(self) -> bool:
        """An infill span: the answer is its gaps, so stop ids in it end nothing early."""
        return self.span_ids is not None

    @property
    def canvas_prompt_len(self) -> int:
        """Fixed context rows besides the span (prompt and suffix)."""
        return len(self.prompt_ids) + len(self.suffix_ids)

    def cancel(self) -> None:
        """Ask the engine to drop this request (thread safe; takes effect before the next step)."""
        self.cancelled = True


class Engine:
    """Continuous-batching loop over one batch (`sampler.batch.Batch`), in its own thread."""

    def __init__(self, model, special, config: EngineConfig | None = None, metrics=None):
        self.model = model
        self.special = special
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.stop_ids = set(special.stop)
        self.mask_id = special.mask
        self.batch = make_batch(model, special, capacity_tokens=self.config.max_batch_tokens,
                                max_requests=self.config.max_batch_size,
                                cuda_graphs=self.config.cuda_graphs,
                                draft_depth=self.config.draft_depth,
                                draft_budget=self.config.draft_budget,
                                adaptive_drafting=self.config.adaptive_drafting)
        pipe = self.config.pipelined
        self.pipelined = self.batch.device.type == "cuda" if pipe is None else bool(pipe)
        self.scorer = ScoreBatch(model, special.mask)
        self.channel = None  # tensor parallel: rank 0's broadcasts to the follower ranks
        self.on_fatal = None  # called once when a rank is lost (the server exits non-zero)
        if getattr(model, "tp", None) is not None:
            self.batch, self.scorer, self.channel = lead(self.batch, self.scorer, model.tp)
            self.channel.on_error = self.rank_lost
        self.scoring: dict[int, ScoreJob] = {}
        self.waiting = FairQueue()
        self.running: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._drain_deadline: float | None = None  # monotonic time the drain's grace ends
        self.alive = False
        self.steps_run = 0
        self._recent_duration: float | None = None  # moving average of request durations (s)
        self.step_failures = 0
        self.tuner = self._thread_tuner()

    def _thread_tuner(self) -> ThreadTuner | None:
        """The live CPU thread policy, where the configuration asks for one: on a CPU, one process."""
        live = tuple(dict.fromkeys(self.config.cpu_threads_live))
        if len(live) < 2 or self.batch.device.type != "cpu" or self.channel is not None:
            return None
        return ThreadTuner(live, torch.get_num_threads(), torch.set_num_threads,
                           interval_s=self.config.cpu_threads_probe_s,
                           on_switch=lambda old, new: self._observe("observe_cpu_thread_switch"))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is not None:
            return self
        if self.batch.graphs is not None:  # capture the hot buckets before serving
            self.batch.graphs.warm(self.batch.hot_buckets())
        self._accepting = True
        self.alive = True
        self._observe("set_cpu_threads", torch.get_num_threads())
        self._thread = threading.Thread(target=self._run, name="llada-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def stop_intake(self) -> None:
        """Refuse new submissions; requests already waiting or running carry on."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()

    def drain(self, grace: float) -> None:
        """Stop intake now; when `grace` seconds have passed, fail whatever is still waiting or
        running with 503 shutting_down (the engine thread does it, within a step of the deadline)."""
        with self._cv:
            self._accepting = False
            self._drain_deadline = time.monotonic() + max(0.0, grace)
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def idle(self) -> bool:
        with self._cv:
            return not self.waiting and not self.running and not self.scoring

    def shutdown(self, grace: float = 30.0) -> None:
        """Stop intake, let in-flight requests finish for up to `grace` seconds, fail the rest."""
        if self._drain_deadline is None:
            self.drain(grace)
        deadline = self._drain_deadline
        while time.monotonic() < deadline and not self.idle():
            time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace))
        if self.channel is not None and not (self._thread is not None and self._thread.is_alive()):
            channel, self.channel = self.channel, None
            try:
                channel.send(STOP)  # the followers return
            except Exception:  # noqa: BLE001 - a follower already gone: nothing to stop
                log.warning("could not stop the follower ranks")
        self.alive = False

    # ------------------------------------------------------------------ submission
    def rows_needed(self, prompt_len: int, params: SamplingParams) -> int:
        return self.batch.rows_needed(prompt_len, params)

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        check_fits(prompt_len, params, self.config.max_batch_tokens, self.batch.block_diffusion)

    def submit(self, handles: list[Handle]) -> list[Handle]:
        """Queue handles together (all or none). Raises QueueFull or EngineStopped."""
        for h in handles:
            self.check_fits(h.canvas_prompt_len, h.params)
        with self._cv:
            if not self.accepting:
                raise EngineStopped()
            if len(self.waiting) + len(handles) > self.config.max_queue:
                raise QueueFull(f"the request queue is full ({len(self.waiting)} waiting, limit "
                                f"{self.config.max_queue}); retry later", retry_after=self._retry_after())
            now = time.monotonic()
            timeout = self.config.request_timeout
            group = next(self._ids)
            for h in handles:
                h.rid = next(self._ids)
                h.group = group
                h.submitted = now
                h.deadline = now + timeout if timeout and timeout > 0 else None
                h.canvas = [None] * h.params.gen_length if h.span_ids is None else \
                    [None if t == self.mask_id else t for t in h.span_ids]
                h.token_info = [None] * h.params.gen_length if h.params.logprobs is not None else None
            self.waiting.push(group, handles, priority=min(h.priority for h in handles))
            self._gauges()
            self._cv.notify_all()
        return handles

    def submit_score(self, job: ScoreJob) -> ScoreJob:
        """Queue a likelihood request. Raises EngineError (too large), QueueFull or EngineStopped."""
        if job.canvas_tokens > self.config.max_batch_tokens:
            raise RequestTooLarge(f"a pair needs {job.canvas_tokens} canvas tokens; this server's "
                                  f"max_batch_tokens is {self.config.max_batch_tokens}", param="pairs")
        with self._cv:
            if not self.accepting:
                raise EngineStopped()
            if len(self.waiting) + len(self.scoring) + 1 > self.config.max_queue:
                raise QueueFull(f"the request queue is full ({len(self.waiting) + len(self.scoring)} "
                                f"waiting, limit {self.config.max_queue}); retry later",
                                retry_after=self._retry_after())
            now = time.monotonic()
            timeout = self.config.request_timeout
            job.rid = next(self._ids)
            job.submitted = now
            job.deadline = now + timeout if timeout and timeout > 0 else None
            self.scorer.add(job)
            self.scoring[job.rid] = job
            self._cv.notify_all()
        return job

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: recent request time scaled by the queue's depth."""
        per = self._recent_duration or 1.0
        depth = 1 + len(self.waiting) / max(1, self.config.max_batch_size)
        return min(60.0, max(1.0, per * depth))

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        # The engine thread only serves: inference mode for all its torch work (no autograd
        # bookkeeping per operation; a small model's forward is measurably faster than under
        # no_grad). Nothing it creates is used with autograd.
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    self._reap()
                    if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                        self._fail_all(EngineStopped("the server shut down before this request finished"))
                    self._admit()
                    if self._stop:
                        self._fail_all(EngineStopped("the server shut down before this request finished"))
                        return
                    if not self.running and not self.scoring:
                        self._cv.wait(timeout=self.config.idle_wait)
                        continue
                if self.running:
                    self._step()
                if self.scoring:
                    self._score_step()
        except BaseException as e:  # the loop itself must never die silently
            log.exception("engine loop crashed: %s", e)
            with self._cv:
                self._fail_all(InternalError(f"the engine stopped: {e}"))
            self.alive = False
            raise
        finally:
            if self.tuner is not None:  # threads started later inherit the count set last: the start's
                torch.set_num_threads(self.tuner.start)

    def _reap(self) -> None:
        """Drop cancelled and timed-out requests (holding the lock)."""
        now = time.monotonic()
        self._expire(list(self.waiting), lambda h: self.waiting.remove(h.group, h), self._finish_error, now)
        self._expire(list(self.scoring.values()), self._drop_score, self._score_error, now)
        self._expire(list(self.running.values()), self._release, self._finish_error, now)
        self._gauges()

    def _expire(self, items, drop, fail, now: float) -> None:
        """Each cancelled item dropped quietly, each one past its deadline dropped and failed (504)."""
        for x in items:
            if x.cancelled:
                drop(x)
                x.done = True
            elif x.deadline is not None and now > x.deadline:
                drop(x)
                fail(x, self._timeout_error())

    def _timeout_error(self) -> EngineError:
        return RequestTimeout(f"the request did not finish within the server's request timeout "
                              f"({self.config.request_timeout:g} s)")

    def _admit(self) -> None:
        """Move waiting requests into the batch in the fair queue's order (holding the lock). The one
        whose turn it is waits for room rather than being overtaken, so a large request is not starved."""
        while len(self.running) < self.config.max_batch_size:
            nxt = self.waiting.peek()
            if nxt is None:
                break
            group, h = nxt
            if not self.batch.can_admit(h.canvas_prompt_len, h.params):
                if not self.running:  # an empty batch that cannot take it never will
                    self.waiting.remove(group, h)
                    self._finish_error(h, RequestTooLarge("the request does not fit the batch buffers"))
                    continue
                break
            try:
                self.batch.add(h.rid, h.prompt_ids, h.params, suffix_ids=h.suffix_ids, span_ids=h.span_ids)
                if self._stop:  # tensor parallel: the ranks were lost while admitting
                    return
            except ParamError as e:
                self.waiting.remove(group, h)
                self._finish_error(h, InvalidRequest(str(e), param=e.field))
                continue
            except CapacityError:
                break
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the loop
                log.exception("admitting request %s failed", h.rid)
                self.waiting.remove(group, h)
                self._finish_error(h, InternalError(f"could not start the request: {e}"))
                continue
            self.waiting.admitted(group, h)
            h.admitted = time.monotonic()
            self.running[h.rid] = h
            self._observe("observe_queued", h.admitted - h.submitted)
        self._gauges()

    def _step(self) -> None:
        n = len(self.batch)
        tuner = self.tuner
        if tuner is not None:
            shown = tuner.current
            tuner.before_step(self.batch.planned_query_tokens())
        t0 = time.perf_counter()
        try:
            events = self.batch.step_async() if self.pipelined else self.batch.step()
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
            if tuner is not None:
                tuner.after_step(0.0)
            self._step_failed(e)
            return
        dt = time.perf_counter() - t0
        if tuner is not None:
            tuner.after_step(dt)
            if tuner.current != shown:
                self._observe("set_cpu_threads", tuner.current)
        self.steps_run += 1
        if self.metrics is not None:
            self.metrics.observe_step(n, dt)
            seen = set()
            for ev in events:  # one observation per request per forward (its events share the forward)
                if ev.forwards is not None and (ev.request_id, ev.forwards) not in seen:
                    seen.add((ev.request_id, ev.forwards))
                    self.metrics.observe_request_forward(ev.forward_steps, ev.draft_rows)
        with self._cv:
            for ev in events:
                h = self.running.get(ev.request_id)
                if h is None:
                    continue
                try:
                    self._route(h, ev)
                except Exception as e:  # noqa: BLE001 - one request's bookkeeping must not stop the loop
                    log.exception("request %s: handling its step event failed", h.rid)
                    self._release(h)
                    self._finish_error(h, InternalError(f"internal error ({type(e).__name__})"))
            self._gauges()

    def _score_step(self) -> None:
        with self._cv:
            canvases = self.scorer.take(self.config.max_batch_tokens)
        if not canvases:
            return
        t0 = time.perf_counter()
        try:
            done = self.scorer.run(canvases)
        except Exception as e:  # noqa: BLE001 - fail the requests in this forward, keep serving
            if getattr(self.model, "tp", None) is not None:
                self.rank_lost(f"{type(e).__name__}: {e}")
                return
            jobs = {id(c.pair.job): c.pair.job for c in canvases}
            log.error("a scoring forward failed (%s: %s); failing its %d requests", type(e).__name__, e,
                      len(jobs), exc_info=True)
            with self._cv:
                for job in jobs.values():
                    self._drop_score(job)
                    self._score_error(job, InternalError(f"internal error while scoring ({type(e).__name__})",
                                                         code="step_failed"))
            return
        if self.metrics is not None:
            self.metrics.observe_score_forward(sum(c.tokens for c in canvases), time.perf_counter() - t0)
        with self._cv:
            for job in done:
                if self.scoring.pop(job.rid, None) is None or job.cancelled:
                    continue
                job.done = True
                try:
                    job.sink(("done", ScoreBatch.results(job)))
                except Exception:  # noqa: BLE001 - a dead consumer must not stop the engine
                    log.debug("scoring request %s: its consumer is gone", job.rid)

    def _drop_score(self, job: ScoreJob) -> None:
        self.scoring.pop(job.rid, None)
        self.scorer.drop(job)

    def _score_error(self, job: ScoreJob, err: EngineError) -> None:
        job.done = True
        try:
            job.sink(("error", err))
        except Exception:  # noqa: BLE001
            log.debug("scoring request %s: its consumer is gone", job.rid)

    def rank_lost(self, reason: str) -> None:
        """Tensor parallel: a rank failed or is gone, so no step can run again. Every waiting and
        running request fails with 503 rank_failed, intake stops (/ready turns 503) and `on_fatal`
        (set by the server: exit non-zero) is called once. Thread safe."""
        with self._cv:
            if not self.alive and self._stop:
                return
            log.error("tensor-parallel rank failure: %s; failing every request", reason)
            self._accepting = False
            self.alive = False
            self._stop = True
            self.channel = None  # nothing more is sent to the ranks
            self._fail_all(RankFailed("the server lost one of its tensor-parallel ranks and is stopping"))
            self._cv.notify_all()
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _step_failed(self, e: Exception) -> None:
        if getattr(self.model, "tp", None) is not None:  # the ranks may be out of step: stop
            self.rank_lost(f"{type(e).__name__}: {e}")
            return
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        self.step_failures += 1
        self.batch.discard()
        log.error("a step failed (%s: %s); failing the %d requests in it", type(e).__name__, e,
                  len(self.running), exc_info=not oom)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if oom:
            err = OutOfMemory("the server ran out of memory while running this request; retry with a "
                              "smaller request or later")
        else:
            err = InternalError(f"internal error while running this request ({type(e).__name__})",
                                code="step_failed")
        with self._cv:
            failed = list(self.running.values())
            for h in failed:
                self._release(h)
                self._finish_error(h, err)
            self._gauges()
        if self.metrics is not None:
            self.metrics.observe_step_failure(len(failed))

    def _route(self, h: Handle, ev: StepEvent) -> None:
        h.steps = ev.step
        h.nfe = ev.nfe
        h.forwards = ev.forwards if ev.forwards is not None else ev.nfe
        canvas = h.canvas
        for p, t in zip(ev.positions, ev.token_ids):
            canvas[p] = t
        for p, t in zip(ev.edited_positions, ev.edited_token_ids):
            canvas[p] = t
        if h.token_info is not None and ev.logprobs is not None:
            for p, lp, top in zip(ev.positions, ev.logprobs, ev.top_logprobs):
                h.token_info[p] = (ev.step, lp, top)
        before = h.prefix
        n = len(canvas) if ev.final_upto is None else ev.final_upto  # editing: only finished blocks
        while h.prefix < n and canvas[h.prefix] is not None:
            if canvas[h.prefix] in (self.stop_ids if h.stop_ids is None else h.stop_ids) \
                    and h.prefix >= h.stop_from:
                h.stop_seen = True
            h.prefix += 1
        if not h.first_token_seen and (h.prefix >= 1 or ev.finished):
            h.first_token_seen = True
            self._observe("observe_first_token", time.monotonic() - h.submitted)
        if h.first_block_s is None and (h.prefix >= min(h.params.block, len(canvas)) or ev.finished):
            h.first_block_s = time.monotonic() - h.submitted
            if self.metrics is not None:
                self.metrics.observe_first_block(h.first_block_s)
        if h.want_steps:
            self._send(h, ("step", ev))
        if h.want_progress and h.prefix > before:
            self._send(h, ("progress", list(canvas[:h.prefix])))
        if not ev.finished and ev.step > h.params.step_limit(len(h.prompt_ids), self.batch.block_diffusion):
            log.error("request %s made no progress after %d steps; failing it", h.rid, ev.step)
            self._release(h)
            self._finish_error(h, InternalError("the sampler made no progress on this request",
                                                code="no_progress"))
            return
        final = not h.infill and (h.stop_seen or (h.answer_limit is not None and h.prefix >= h.answer_limit))
        if ev.finished or (final and self.config.early_stop and not h.want_steps):
            gen = ev.gen_ids if ev.finished else [self.mask_id if t is None else t for t in canvas]
            self._release(h)
            now = time.monotonic()
            res = Result(gen_ids=list(gen), nfe=ev.nfe, steps=ev.step, early=not ev.finished,
                         queued_s=(h.admitted or now) - h.submitted, duration_s=now - h.submitted,
                         first_block_s=h.first_block_s, token_info=h.token_info, forwards=h.forwards)
            d = res.duration_s
            self._recent_duration = d if self._recent_duration is None else 0.9 * self._recent_duration + 0.1 * d
            if self.metrics is not None:
                unmasked = sum(1 for t in canvas if t is not None)
                self.metrics.observe_finished(unmasked / max(ev.nfe, 1))
            h.done = True
            self._send(h, ("done", res))

    # ------------------------------------------------------------------ helpers (lock held)
    def _release(self, h: Handle) -> None:
        if self.running.pop(h.rid, None) is not None:
            self.waiting.finished(h.group)
        try:
            self.batch.remove(h.rid)
        except Exception:  # noqa: BLE001
            log.exception("removing request %s from the batch failed", h.rid)

    def _finish_error(self, h: Handle, err: EngineError) -> None:
        h.done = True
        self._send(h, ("error", err))

    def _send(self, h: Handle, item) -> None:
        if h.cancelled and item[0] != "error":
            return
        try:
            h.sink(item)
        except Exception:  # noqa: BLE001 - a dead consumer must not stop the engine
            log.debug("request %s: its consumer is gone", h.rid)
            h.cancelled = True

    def _fail_all(self, err: EngineError) -> None:
        for h in self.waiting.clear():
            self._finish_error(h, err)
        for h in list(self.running.values()):
            self._release(h)
            self._finish_error(h, err)
        for job in list(self.scoring.values()):
            self._drop_score(job)
            self._score_error(job, err)
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self.waiting), len(self.running))
            self._observe("set_kv_usage", self.batch.rows_in_use, self.batch.capacity)

    def _observe(self, hook: str, *args) -> None:
        """An optional metrics hook (a metrics object may implement only the required ones)."""
        fn = getattr(self.metrics, hook, None)
        if fn is not None:
            fn(*args)
