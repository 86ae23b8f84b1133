"""A straightforward implementation of LLaDA2.0's and LLaDA2.1's `generate`, one request at a time.

Full recompute of the window canvas[0 : end of the current block] with the block-causal mask at
every step, float64 softmax, plain Python loops: the algorithms as ../shared/reference/LLADA2.md
states them, with none of the serving machinery. It is the oracle the tests compare the batched
step against and the baseline the benchmarks report ratios to. Temperature 0 only.
"""

from __future__ import annotations

import torch

from sampler.params import SamplingParams
from sampler.rules import cut_after_eos, quota


@torch.no_grad()
def _forward(model, x: torch.Tensor, end: int, block_length: int):
    """Block-causal forward of canvas[0:end]: (argmax, its float64 softmax probability) per row."""
    logits = model.full_logits(x[:end].unsqueeze(0), block_length=block_length)[0].to(torch.float64)
    probs = torch.softmax(logits, dim=-1)
    conf, x0 = probs.max(dim=-1)
    return x0, conf


def _pick(conf: torch.Tensor, candidates: list[int], k: int, threshold: float) -> list[int]:
    """The candidates with conf > threshold if there are at least k of them, else the k most
    confident (at most as many as there are candidates)."""
    above = [i for i in candidates if conf[i] > threshold]
    if len(above) >= k:
        return above
    ranked = sorted(candidates, key=lambda i: -float(conf[i]))
    return ranked[:min(k, len(candidates))]


@torch.no_grad()
def llada2_generate(model, prompt_ids, params: SamplingParams, mask_id: int, eos_id: int
                    ) -> tuple[list[int], int]:
    """(generated ids cut after the first EOS, forwards) of LLaDA2.0 (`editing_threshold` None)
    or LLaDA2.1 (`editing_threshold` set)."""
    p, g, bl = len(prompt_ids), params.gen_length, params.block
    total = -(-(p + g) // bl) * bl
    x = torch.full((total,), mask_id, dtype=torch.int64, device=model.device)
    x[:p] = torch.tensor(list(prompt_ids), dtype=torch.int64)
    editing = params.editing_threshold is not None
    steps = min(params.llada2_steps, g // params.minimal_topk)
    counts = quota(bl, steps)
    nfe = 0
    for b in range(p // bl, total // bl):
        lo, hi = b * bl, (b + 1) * bl
        if not editing:
            for t in range(steps):
                masked = [i for i in range(lo, hi) if x[i] == mask_id]
                if not masked:
                    break
                x0, conf = _forward(model, x, hi, bl)
                nfe += 1
                chosen = _pick(conf, masked, counts[t], params.threshold)
                for i in chosen:
                    x[i] = x0[i]
                if params.eos_early_stop and any(int(x[i]) == eos_id for i in chosen):
                    gen = x[p:].tolist()
                    first = gen.index(eos_id)
                    if mask_id not in gen[:first]:
                        return gen[:min(first + 1, g)], nfe
            if eos_id in x[p:hi].tolist():
                break
        else:
            post = 0
            while True:
                masked = [i for i in range(lo, hi) if x[i] == mask_id]
                if not masked:
                    post += 1
                    if post > params.max_post_steps:
                        break
                x0, conf = _forward(model, x, hi, bl)
                nfe += 1
                chosen = _pick(conf, masked, params.num_to_transfer, params.threshold) if masked else []
                decoded = [i for i in range(max(lo, p), hi) if x[i] != mask_id]
                edits = [i for i in decoded if x0[i] != x[i] and conf[i] > params.editing_threshold]
                for i in chosen + edits:
                    x[i] = x0[i]
                if not masked and not edits:
                    break
            span = x[p:hi].tolist()
            if params.eos_early_stop and mask_id not in span and eos_id in span:
                break
    return cut_after_eos(x[p:p + g].tolist(), eos_id), nfe
