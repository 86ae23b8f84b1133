"""Exact parallel decoding on the embedded default model: tokens/s and forwards per token by depth
and batch size, on its held-out chat prompts (one block of 16, one token per step, greedy).

    python -m bench.bench_drafting [--per-task 6] [--depths 0 4 8] [--batches 1 32]

Each row runs every prompt through `sampler.generate.generate` in batches of the given size; the
answers at every depth are checked against depth 0 (the run fails on any difference).
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
            sp = SamplingParams(gen_length=16, steps=16, draft_depth=depth)
            generate(bundle, prompts[:2], sp)  # warm-up
            t0 = time.perf_counter()
            gens, rows = [], 0
            for i in range(0, len(prompts), bs):
                evs = []
                gens += generate(bundle, prompts[i:i + bs], sp, on_event=evs.append)
                per_forward = {(e.request_id, e.forwards): e.draft_rows for e in evs}  # once per forward
                rows += sum(per_forward.values())
            dt = time.perf_counter() - t0
            ids = [g.gen_ids for g in gens]
            if base is None:
                base = ids
            elif ids != base:
                print(f"FAIL: depth {depth} changed the answers", file=sys.stderr)
                return 1
            fwd = sum(g.forwards for g in gens)
            print(f"| {bs} | {depth} | {16 * len(gens) / dt:.0f} | {fwd / (16 * len(gens)):.3f} | "
                  f"{rows / max(fwd, 1):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
