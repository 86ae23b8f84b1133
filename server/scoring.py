"""POST /v1/loglikelihood: pairs from the request, one scoring job in the engine, the response.

Text is tokenised the way evaluation harnesses split a pair: the context alone, then context +
continuation; when the context's ids are a prefix of the joint ids, the continuation is the rest
of the joint ids (so a word split across the boundary is scored as the model would see it),
otherwise the continuation is tokenised alone.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from sampler.likelihood import MAX_MC_SAMPLES, ScoreJob
from sampler.scheduler import EngineError
from server import checks
from server.errors import ApiError
from server.guards import outcome_of
from server.schemas import LoglikelihoodRequest

DEFAULT_MC_SAMPLES = 32
DISCONNECT_POLL_S = 0.25


def _ids(svc, value, what: str, allow_empty: bool) -> list[int]:
    if isinstance(value, str):
        return checks.need_tokenizer(svc, f"a text {what}").encode(value) if value else []
    return checks.in_vocabulary(svc, value, what)


def pair_ids(svc, pair, index: int) -> tuple[list[int], list[int]]:
    where = f"pairs.{index}"
    both = (pair.context, pair.continuation)
    if all(isinstance(x, str) for x in both):  # cheap bound before any encoding
        checks.fits_context(svc, where, chars=sum(len(x) for x in both))
    elif all(isinstance(x, list) for x in both):
        checks.fits_context(svc, where, tokens=sum(len(x) for x in both))
    ctx = _ids(svc, pair.context, f"{where}.context", True)
    if isinstance(pair.context, str) and isinstance(pair.continuation, str) and pair.continuation:
        joint = checks.need_tokenizer(svc, "text").encode(pair.context + pair.continuation)
        cont = joint[len(ctx):] if joint[:len(ctx)] == ctx else _ids(svc, pair.continuation, where, False)
    else:
        cont = _ids(svc, pair.continuation, f"{where}.continuation", False)
    if not cont:
        raise ApiError(400, f"{where}.continuation is empty: there is nothing to score",
                       param=f"{where}.continuation", code="empty_prompt")
    for part, ids in (("context", ctx), ("continuation", cont)):
        checks.no_mask(svc, ids, f"{where}.{part}", scored=True)
    checks.pair_fits(svc, where, ctx, cont)
    return ctx, cont


def build_job(svc, body: LoglikelihoodRequest, sink) -> ScoreJob:
    checks.model(svc, body.model)
    if not body.pairs:
        raise ApiError(400, "pairs is empty", param="pairs", code="empty_prompt")
    # More than MAX_SCORING_PAIRS pairs were refused before validation (checks.raw_sizes).
    mc = DEFAULT_MC_SAMPLES if body.mc_samples is None else body.mc_samples
    if not 1 <= mc <= MAX_MC_SAMPLES:
        raise ApiError(400, f"mc_samples must be between 1 and {MAX_MC_SAMPLES}, got {mc}", param="mc_samples",
                       code="invalid_value")
    cfg = 0.0 if body.cfg_scale is None else float(body.cfg_scale)
    if not 0 <= cfg < float("inf"):
        raise ApiError(400, f"cfg_scale must be a finite number >= 0, got {cfg}", param="cfg_scale",
                       code="invalid_value")
    seed = 0 if body.seed is None else body.seed
    checks.seed(seed)
    pairs = [pair_ids(svc, p, i) for i, p in enumerate(body.pairs)]
    return ScoreJob(pairs=pairs, mc_samples=mc, seed=seed, cfg_scale=cfg, sink=sink)


async def serve_loglikelihood(request: Request, body: LoglikelihoodRequest) -> dict:
    svc = request.app.state.service
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def sink(item):
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(item))

    job = await asyncio.to_thread(build_job, svc, body, sink)  # tokenizing off the event loop
    try:
        svc.engine.submit_score(job)
    except EngineError as e:
        raise ApiError.from_engine(e) from None
    while True:
        try:
            kind, payload = await asyncio.wait_for(asyncio.shield(done), timeout=DISCONNECT_POLL_S)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                svc.engine.wake()
                return None
    if kind == "error":
        raise ApiError.from_engine(payload)
    data = []
    for i, ((ctx, cont), r) in enumerate(zip(job.pairs, payload)):
        data.append({"index": i, "logprob": r.logprob, "stderr": r.stderr, "is_greedy": r.is_greedy,
                     "forwards": r.forwards, "context_tokens": len(ctx), "continuation_tokens": r.tokens})
    tokens = sum(len(c) + len(y) for c, y in job.pairs)
    rec = outcome_of(request)  # the guard counts and logs the response from it
    rec.usage = {"prompt_tokens": tokens}
    rec.detail = f"{len(data)} pair(s), {tokens} tokens, {job.mc_samples} samples each"
    return {"object": "loglikelihood", "model": svc.name, "mc_samples": job.mc_samples, "seed": job.seed,
            "cfg_scale": job.cfg_scale, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                      "forwards": sum(d["forwards"] for d in data)}}
