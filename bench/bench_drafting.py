"""Exact parallel decoding on the embedded default model: tokens/s and forwards per token by depth
and batch size, on its held-out chat prompts (one block of 16, one token per step, greedy).

    python -m bench.bench_drafting [--per-task 6] [--depths 0 4 8] [--batches 1 32] [--gate]

Each row runs every prompt through `sampler.generate.generate` in batches of the given size; the
answers at every depth are checked against depth 0 (the run fails on any difference). `--gate`:
every row runs the prompts through one long-lived batch instead, as the server's engine does
(a prompt joins when a slot is free), and each depth above 0 gets a second row with the batch's
draft gate on (`sampler.draft_gate`: draft rows only while its timed steps say they pay).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))

from sampler.generate import generate  # noqa: E402
from sampler.params import SamplingParams  # noqa: E402
from sampler.strategies import make_batch  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402


def main(argv=None) -> int:
    from evaluate import prompts_for  # training/evaluate.py
    from tasks import TaskSet

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "weights" / "default")
    ap.add_argument("--per-task", type=int, default=6)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gate", action="store_true",
                    help="one long-lived batch per row, and rows with the draft gate on")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_checkpoint(args.model, device="cpu", dtype="float32")
    prompts = [p for xs in TaskSet().heldout(args.per_task).values() for p in prompts_for(bundle, xs)]
    print(f"{len(prompts)} prompts, gen_length 16, 16 steps, greedy, {args.threads} thread(s)")
    print("| batch | draft depth | tokens/s | forwards / token | draft rows / forward |")
    print("|---|---|---|---|---|")
    for bs in args.batches:
        base = None
        for depth in args.depths:
            for gate in ([False, True] if args.gate and depth else [False]):
                sp = SamplingParams(gen_length=16, steps=16, draft_depth=depth)
                run = (lambda: _one_batch(bundle, prompts, sp, bs, gate)) if args.gate else \
                    (lambda: _by_generate(bundle, prompts, sp, bs))
                t0 = time.perf_counter()
                ids, fwd, rows = run()
                dt = time.perf_counter() - t0
                if base is None:
                    base = ids
                elif ids != base:
                    print(f"FAIL: depth {depth} changed the answers", file=sys.stderr)
                    return 1
                label = f"{depth}, gate on" if gate else (f"{depth}, gate off" if args.gate and depth else depth)
                print(f"| {bs} | {label} | {16 * len(ids) / dt:.0f} | {fwd / (16 * len(ids)):.3f} | "
                      f"{rows / max(fwd, 1):.2f} |", flush=True)
    return 0


def _by_generate(bundle, prompts, sp, bs):
    """(ids, forwards, draft rows): the prompts through `generate`, `bs` at a time."""
    generate(bundle, prompts[:2], sp)  # warm-up
    gens, rows = [], 0
    for i in range(0, len(prompts), bs):
        evs = []
        gens += generate(bundle, prompts[i:i + bs], sp, on_event=evs.append)
        per_forward = {(e.request_id, e.forwards): e.draft_rows for e in evs}  # once per forward
        rows += sum(per_forward.values())
    return [g.gen_ids for g in gens], sum(g.forwards for g in gens), rows


def _one_batch(bundle, prompts, sp, bs, gate: bool):
    """(ids, forwards, draft rows): the prompts through one batch of `bs` slots, each joining when
    a slot is free, as the engine runs them (timed after one warm-up prompt on the same batch)."""
    rows_each = max(len(p) for p in prompts) + sp.gen_length
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=bs * rows_each, max_requests=bs,
                       draft_budget=2048 if sp.draft_depth else 0, adaptive_drafting=gate)
    _drain(batch, [prompts[0]], sp)
    f0, r0 = batch.forwards, getattr(batch, "draft_rows_run", 0)
    ids = _drain(batch, prompts, sp)
    return ids, batch.forwards - f0, getattr(batch, "draft_rows_run", 0) - r0


def _drain(batch, prompts, sp):
    pending, done = list(enumerate(prompts)), {}
    while pending or len(batch):
        while pending and batch.can_admit(len(pending[0][1]), sp):
            i, p = pending.pop(0)
            batch.add(i, p, sp)
        for ev in batch.step():
            if ev.finished:
                done[ev.request_id] = ev.gen_ids
                batch.remove(ev.request_id)
    return [done[i] for i in range(len(prompts))]


if __name__ == "__main__":
    sys.exit(main())
