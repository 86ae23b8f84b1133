"""A straightforward implementation of the reference sampler, one request at a time.

Full recompute every step, eager PyTorch, float64 softmax, the per-row top-k loop: the algorithm
exactly as ../shared/reference/LLADA.md states it, with none of the serving machinery. It is the
oracle the tests compare the batched step against and the baseline the benchmarks report ratios to.
"""

from __future__ import annotations

import torch

from kernels import rng
from sampler.params import SamplingParams


def schedule(masked: int, steps: int) -> list[int]:
    """Tokens to unmask at each of `steps` steps: the first masked % steps get one more."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


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
                       stop_ids=()) -> tuple[list[int], int]:
    """(generated ids, forwards) for one prompt, exact mode (no cache), reference semantics.

    Supports the s/t schedule and the threshold rule, both remasking modes, temperature through
    the same counter-based noise as the server (so seeded runs compare), CFG and the EOS rules."""
    dev = model.device
    p, g, bl = len(prompt_ids), params.gen_length, params.block
    x = torch.tensor(list(prompt_ids) + [mask_id] * g, dtype=torch.int64, device=dev)
    seed = params.seed or 0
    forwards = 0
    step_no = 0
    for blk in range(params.blocks):
        lo, hi = p + blk * bl, p + (blk + 1) * bl
        counts = schedule(int((x[lo:hi] == mask_id).sum()), params.steps_per_block) \
            if params.threshold is None else None
        i = 0
        while bool((x[lo:hi] == mask_id).any()):
            if counts is not None and i >= len(counts):
                break
            logits = model.full_logits(x.unsqueeze(0))[0].to(torch.float64)
            forwards += 1
            if params.cfg_scale > 0:
                un = x.clone()
                un[:p] = mask_id
                u = model.full_logits(un.unsqueeze(0))[0].to(torch.float64)
                c = logits
                logits = u + (params.cfg_scale + 1) * (c - u)
            if params.ban_eos:
                logits[:, model.config.eos_token_id] = float("-inf")
            positions = torch.arange(x.numel(), device=dev)
            x0 = candidates(logits, params.temperature, seed, step_no, lo, hi)
            # A candidate equal to the mask id would leave its position masked: such rows are
            # drawn again with the mask id banned (the server's rule; trained models never do it).
            bad = (x0 == mask_id).nonzero().squeeze(1)
            if len(bad):
                logits = logits.clone()
                logits[bad, mask_id] = float("-inf")
                x0 = candidates(logits, params.temperature, seed, step_no, lo, hi)
            probs = torch.softmax(logits, dim=-1)
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
            if counts is not None:
                k = counts[i]
                _, idx = torch.topk(conf, k)
            else:
                k = int(masked[lo:hi].sum())
                vals, idx = torch.topk(conf, k)
                idx = idx[torch.cat([torch.ones(1, dtype=torch.bool, device=dev),
                                     vals[1:] >= params.threshold])]
            x[idx] = x0[idx]
            i += 1
            step_no += 1
    return x[p:].tolist(), forwards


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
