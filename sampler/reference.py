"""A straightforward implementation of the reference sampler, one request at a time.

Full recompute every step, eager PyTorch, float64 softmax, the per-row top-k loop: the algorithm
exactly as ../shared/reference/LLADA.md states it, with none of the serving machinery. It is the
oracle the tests compare the batched step against and the baseline the benchmarks report ratios to.
"""

from __future__ import annotations

import torch

from kernels import rng
from kernels.selection import RowFilters, restrict_logits
from sampler.params import SamplingParams
from sampler.rules import quota


def candidates(logits, temperature, seed, step_no, lo, hi):
    """argmax per position; inside the block [lo, hi) a Gumbel-max sample when temperature > 0."""
    x0 = torch.argmax(logits, dim=-1)
    if temperature > 0:
        for pos in range(lo, hi):
            u = rng.uniform(torch.tensor(seed), torch.tensor(step_no), torch.tensor(pos),
                            torch.arange(logits.shape[1], device=logits.device))
            x0[pos] = torch.argmax(logits[pos] - temperature * torch.log(-torch.log(u)))
    return x0


@torch.no_grad()
def reference_generate(model, prompt_ids, params: SamplingParams, mask_id: int,
                       stop_ids=(), suffix_ids=(), span_ids=None, trace=None) -> tuple[list[int], int]:
    """(generated ids, forwards) for one prompt, exact mode (no cache), reference semantics.

    Supports the s/t schedule and the threshold rule, both remasking modes, temperature through
    the same counter-based noise as the server (so seeded runs compare), CFG and the EOS rules.

    Infilling: the canvas is prompt ++ span ++ suffix, where the span is `gen_length` masks or
    `span_ids` (mask ids where tokens are to be filled, fixed tokens elsewhere). Blocks cover the
    span only; each block's schedule counts its masked positions and a block without any is
    skipped (no forward). The suffix is context every step attends to; with CFG the unconditional
    canvas masks the prompt and the suffix. `params.min_tokens`: the span's first min_tokens
    positions never take one of `stop_ids` (their logits are -inf there).

    Sampling filters (params.top_k/top_p/min_p) restrict the sampled rows' logits before the draw;
    the confidence is the candidate's probability under the restricted, renormalised distribution.
    `trace`, a dict, receives for every filled span position (relative) the tuple
    (step that committed it, its log-probability in that step, [(token, log-probability)] of the
    `params.logprobs` most likely tokens): the log-softmax of the committing step's logits at
    temperature 1 after bans and filters, the distribution the confidence is taken from."""
    dev = model.device
    p, g, bl = len(prompt_ids), params.gen_length, params.block
    span = [mask_id] * g if span_ids is None else list(span_ids)
    assert len(span) == g
    x = torch.tensor(list(prompt_ids) + span + list(suffix_ids), dtype=torch.int64, device=dev)
    seed = params.seed or 0
    forwards = 0
    step_no = 0
    for blk in range(params.blocks):
        lo, hi = p + blk * bl, p + (blk + 1) * bl
        counts = quota(int((x[lo:hi] == mask_id).sum()), params.steps_per_block) \
            if params.threshold is None else None
        i = 0
        while bool((x[lo:hi] == mask_id).any()):
            if counts is not None and i >= len(counts):
                break
            logits = guided_logits(model, x, params, p, g, mask_id, stop_ids)
            forwards += 1
            positions = torch.arange(x.numel(), device=dev)
            dist = restricted(logits, params, lo, hi)
            x0 = candidates(dist, params.temperature, seed, step_no, lo, hi)
            # A candidate equal to the mask id would leave its position masked: such rows are
            # drawn again with the mask id banned (the server's rule; trained models never do it).
            bad = (x0 == mask_id).nonzero().squeeze(1)
            if len(bad):
                logits = logits.clone()
                logits[bad, mask_id] = float("-inf")
                dist = restricted(logits, params, lo, hi)
                x0 = candidates(dist, params.temperature, seed, step_no, lo, hi)
            probs = torch.softmax(dist, dim=-1)
            if params.remasking == "low_confidence":
                conf = probs.gather(1, x0.unsqueeze(1)).squeeze(1)
            else:
                conf = rng.uniform(torch.tensor(seed), torch.tensor(step_no), positions,
                                   torch.tensor(rng.REMASK_STREAM))
            if params.defer_eos and stop_ids:
                is_stop = torch.isin(x0, torch.tensor(list(stop_ids), device=dev))
                conf = torch.where(is_stop, torch.full_like(conf, -1.0), conf)
            masked = x == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            conf[hi:] = float("-inf")
            conf[:lo] = float("-inf")
            # The k most confident, ties to the lower position (a stable sort): with sampling filters
            # several positions can share confidence 1 (a kept set of one token).
            order = torch.sort(conf, descending=True, stable=True)
            if counts is not None:
                idx = order.indices[:counts[i]]
            else:
                k = int(masked[lo:hi].sum())
                vals, idx = order.values[:k], order.indices[:k]
                idx = idx[torch.cat([torch.ones(1, dtype=torch.bool, device=dev),
                                     vals[1:] >= params.threshold])]
            x[idx] = x0[idx]
            if trace is not None:
                logp = torch.log_softmax(dist, dim=-1)
                for j in idx.tolist():
                    trace[j - p] = (step_no + 1, float(logp[j, x0[j]]), top_logprobs(logp[j], params.logprobs or 0))
            i += 1
            step_no += 1
    return x[p:p + g].tolist(), forwards


def guided_logits(model, x, params: SamplingParams, p: int, g: int, mask_id: int, stop_ids=()):
    """float64 logits of the canvas `x` (prompt p, span g): with CFG u + (s + 1) * (c - u), the
    unconditional canvas with prompt and suffix masked; eos_bias added to EOS; EOS at -inf with
    ban_eos; `stop_ids` at -inf at the span's first params.min_tokens positions."""
    logits = model.full_logits(x.unsqueeze(0))[0].to(torch.float64)
    if params.cfg_scale > 0:
        un = x.clone()
        un[:p] = mask_id
        un[p + g:] = mask_id
        u = model.full_logits(un.unsqueeze(0))[0].to(torch.float64)
        c = logits
        logits = u + (params.cfg_scale + 1) * (c - u)
    logits[:, model.config.eos_token_id] += params.eos_bias
    if params.ban_eos:
        logits[:, model.config.eos_token_id] = float("-inf")
    if params.min_tokens:
        logits[p:p + params.min_tokens, list(stop_ids)] = float("-inf")
    return logits


def restricted(logits, params: SamplingParams, lo: int, hi: int):
    """The logits the candidates of block [lo, hi) are drawn from: sampling filters applied."""
    if not params.filtered:
        return logits
    n = hi - lo
    f = RowFilters(torch.full((n,), params.top_k, dtype=torch.int64),
                   torch.full((n,), float(params.top_p), dtype=torch.float64),
                   torch.full((n,), float(params.min_p), dtype=torch.float64))
    out = logits.clone()
    out[lo:hi] = restrict_logits(logits[lo:hi], torch.full((n,), float(params.temperature)), f)
    return out


def top_logprobs(logp_row, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of one row (finite ones only), most likely first."""
    if n <= 0:
        return []
    vals, idx = torch.topk(logp_row, min(n, logp_row.numel()))
    return [(int(t), float(v)) for t, v in zip(idx.tolist(), vals.tolist()) if v != float("-inf")]


@torch.no_grad()
def reference_loglikelihood(model, context, continuation, masks, mask_id: int,
                            cfg_scale: float = 0.0) -> tuple[list[float], bool]:
    """(per-sample values, is_greedy) of the Monte Carlo likelihood, one full forward per sample.

    `masks` lists, per sample, the continuation indices to mask; the value of a sample is
    -(n / l) * (cross-entropy summed over its l masked positions), computed in float64."""
    p, n = len(context), len(continuation)
    y = torch.tensor(list(continuation), dtype=torch.int64)

    def logits_of(canvas):
        c = model.full_logits(torch.tensor([canvas]))[0].to(torch.float64)
        if cfg_scale > 0:
            u = model.full_logits(torch.tensor([[mask_id] * p + canvas[p:]]))[0].to(torch.float64)
            c = u + (cfg_scale + 1) * (c - u)
        return c.cpu()

    values = []
    for m in masks:
        canvas = list(context) + [mask_id if j in m else t for j, t in enumerate(continuation)]
        logp = torch.log_softmax(logits_of(canvas)[p:], dim=-1)
        idx = torch.tensor(sorted(m), dtype=torch.int64)
        values.append(-(n / len(idx)) * float(-logp[idx, y[idx]].sum()))
    greedy = logits_of(list(context) + [mask_id] * n)[p:].argmax(dim=-1)
    return values, bool(torch.equal(greedy, y))
