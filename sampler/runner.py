"""The model runner of a tensor-parallel engine: rank 0 leads, the other ranks follow.

Rank 0 owns the engine (`sampler.scheduler.Engine`: admission, scheduling, events) and its batch;
every other rank holds an identical batch over its shard of the model. Whatever changes a batch
reaches the followers as a broadcast of one small int64 header (the operation and its integer
arguments), plus, for admissions and scoring forwards only, the request's data (token ids and
parameters as JSON bytes in a uint8 tensor):

    STEP / STEP_ASYNC   every rank runs the same step (the collectives of the forward and of the
                        selection pair up); a step is the header alone
    ADD rid             the request's prompt, suffix, span and SamplingParams
    REMOVE rid, DISCARD the same bookkeeping on every rank
    SCORE               the canvases of one packed scoring forward
    STOP                followers return

Each rank plans the step itself from the same state (the host plan is a pure function of it, and
the selection returns identical candidates on every rank), so the per-step traffic is the header.
Operations without collectives (add, remove, discard) run on rank 0 first and are sent only when
they succeeded; steps and scoring forwards are sent first, then run.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch
import torch.distributed as dist

from sampler.likelihood import ScoreBatch, _Canvas, _Pair
from sampler.params import SamplingParams

log = logging.getLogger("llada.runner")

STOP, STEP, STEP_ASYNC, ADD, REMOVE, DISCARD, SCORE = range(7)


class Channel:
    """Broadcasts from rank 0 to every rank of `tp`'s group (on the CPU for gloo, else the model's
    device)."""

    def __init__(self, tp, device):
        self.tp = tp
        self.device = device

    def send(self, op: int, arg: int = 0, payload: dict | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        head = torch.tensor([op, arg, len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(head, 0, group=self.tp.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), 0,
                           group=self.tp.group)

    def receive(self) -> tuple[int, int, dict | None]:
        head = torch.empty(3, dtype=torch.int64, device=self.device)
        dist.broadcast(head, 0, group=self.tp.group)
        op, arg, n = head.tolist()
        if not n:
            return op, arg, None
        buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, 0, group=self.tp.group)
        return op, arg, json.loads(bytes(buf.cpu().tolist()))


def _params_dict(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)


def _canvases_payload(canvases) -> dict:
    return {"c": [{"ids": c.ids, "rows": c.rows, "masked": list(c.masked), "greedy": c.greedy,
                   "cfg": c.pair.cfg_scale, "ctx": c.pair.context, "cont": c.pair.continuation}
                  for c in canvases]}


def _canvases_from(payload: dict):
    out = []
    for c in payload["c"]:
        pair = _Pair(None, 0, c["ctx"], c["cont"], float(c["cfg"]), [tuple(c["masked"])])
        out.append(_Canvas(pair, tuple(c["masked"]), bool(c["greedy"]), c["ids"], c["rows"]))
    return out


class LeaderBatch:
    """Rank 0's batch: the `Batch` interface, each change sent to the followers."""

    def __init__(self, batch, channel: Channel):
        self._batch = batch
        self._ch = channel

    def __getattr__(self, name):  # read-only parts of the interface
        return getattr(self._batch, name)

    def __len__(self) -> int:
        return len(self._batch)

    def add(self, rid, prompt_ids, params, suffix_ids=(), span_ids=None) -> None:
        self._batch.add(rid, prompt_ids, params, suffix_ids=suffix_ids, span_ids=span_ids)
        self._ch.send(ADD, rid, {"prompt": list(prompt_ids), "params": _params_dict(params),
                                 "suffix": list(suffix_ids or ()),
                                 "span": None if span_ids is None else list(span_ids)})

    def remove(self, rid) -> None:
        self._batch.remove(rid)
        self._ch.send(REMOVE, rid)

    def discard(self) -> None:
        self._batch.discard()
        self._ch.send(DISCARD)

    def step(self):
        self._ch.send(STEP)
        return self._batch.step()

    def step_async(self):
        self._ch.send(STEP_ASYNC)
        return self._batch.step_async()


class LeaderScorer:
    """Rank 0's scoring batch: each packed forward's canvases sent to the followers first."""

    def __init__(self, scorer: ScoreBatch, channel: Channel):
        self._scorer = scorer
        self._ch = channel

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def __len__(self) -> int:
        return len(self._scorer)

    def run(self, canvases):
        self._ch.send(SCORE, 0, _canvases_payload(canvases))
        return self._scorer.run(canvases)


def lead(batch, scorer, tp):
    """(batch, scorer) for rank 0's engine: the same objects, mirrored on every rank."""
    ch = Channel(tp, batch.device if _device_channel(tp) else torch.device("cpu"))
    return LeaderBatch(batch, ch), LeaderScorer(scorer, ch), ch


def _device_channel(tp) -> bool:
    return dist.get_backend(tp.group) == "nccl"


def follow(batch, scorer, tp) -> None:
    """A follower's loop: apply rank 0's operations to this rank's batch until STOP. A step that
    fails here fails on rank 0 too (same state, same inputs); its DISCARD follows."""
    ch = Channel(tp, batch.device if _device_channel(tp) else torch.device("cpu"))
    while True:
        op, arg, payload = ch.receive()
        if op == STOP:
            return
        try:
            if op == STEP:
                batch.step()
            elif op == STEP_ASYNC:
                batch.step_async()
            elif op == ADD:
                batch.add(arg, payload["prompt"], SamplingParams(**payload["params"]),
                          suffix_ids=payload["suffix"], span_ids=payload["span"])
            elif op == REMOVE:
                batch.remove(arg)
            elif op == DISCARD:
                batch.discard()
            elif op == SCORE:
                scorer.run(_canvases_from(payload))
            else:
                raise RuntimeError(f"unknown runner operation {op}")
        except Exception:  # noqa: BLE001 - rank 0 sees the same failure and decides
            log.exception("rank %d: operation %d failed", tp.rank, op)


def serve_follower(model, special, config) -> None:
    """A follower rank of an engine with `config` (`sampler.scheduler.EngineConfig`): the same
    batch and scorer as rank 0's, driven by rank 0 until it stops."""
    from sampler.strategies import make_batch

    batch = make_batch(model, special, capacity_tokens=config.max_batch_tokens,
                       max_requests=config.max_batch_size, cuda_graphs=config.cuda_graphs)
    if batch.graphs is not None:
        batch.graphs.warm(batch.hot_buckets())
    follow(batch, ScoreBatch(model, special.mask), model.tp)
