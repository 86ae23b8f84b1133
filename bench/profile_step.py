"""Where one engine step's time goes: kernels launched, host time and GPU time per step.

    python -m bench.profile_step                 # CUDA: random LLaDA-8B shape, bf16
    python -m bench.profile_step --device cpu --shape tiny

For each case (batch 1 and 64 requests, dual cache and exact) it brings the batch to a block
step in steady state, then times `batch.step()` plus the event read:
  host ms/step   host time inside the step's launch and event read, waiting for the device
                 excluded (on the CPU everything is host time),
  GPU ms/step    device time between events around the steps (synchronised at the end),
  kernels/step   CUDA kernels the step launches (torch.profiler), and the top kernels by time;
  ops/step       aten operations the step dispatches (a dispatch-mode counter; any device): on the
                 CPU the proxy for the launches an eager CUDA step would make.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from bench.bench_engine import SHAPES, build_random, sync
from sampler.params import SamplingParams
from sampler.strategies import make_batch, rows_needed


def _batch_for(bundle, n, mode, P, G, B, rnd, graphs=None):
    vocab = min(bundle.config.vocab_size, bundle.config.mask_token_id)
    reqs = [([rnd.randrange(0, vocab) for _ in range(P)],
             SamplingParams(gen_length=G, block_length=B, cache=mode)) for _ in range(n)]
    rows = sum(rows_needed(len(p), sp) for p, sp in reqs)
    try:
        batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows,
                           max_requests=max(n, 1), cuda_graphs=graphs)
    except TypeError:  # an older engine (the "before" run): no graphs to choose
        batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows, max_requests=max(n, 1))
    for i, (p, sp) in enumerate(reqs):
        batch.add(i, p, sp)
    return batch


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _drain(batch):
    """Consume events (the engine's work) so host time includes reading them."""
    late = hasattr(batch, "step_async") and batch.device.type == "cuda"
    evs = batch.step_async() if late else batch.step()
    return sum(len(e.positions) for e in evs)


def profile_case(bundle, n, mode, P, G, B, steps, rnd, top=8, graphs=None):
    batch = _batch_for(bundle, n, mode, P, G, B, rnd, graphs)
    dev = bundle.model.device
    # Two steps: the block start (full canvas) and a first block step, compile/warm everything.
    for _ in range(3):
        _drain(batch)
    sync(dev)
    timed_host = not hasattr(batch, "host_seconds")  # older engine: time its step calls instead
    h0, f0 = getattr(batch, "host_seconds", 0.0), batch.forwards
    if dev.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
    t_all = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        _drain(batch)
        if timed_host:
            h0 -= time.perf_counter() - t
    if dev.type == "cuda":
        e1.record()
    sync(dev)
    host_ms = 1e3 * (getattr(batch, "host_seconds", 0.0) - h0) / max(batch.forwards - f0, 1)
    wall = (time.perf_counter() - t_all) / steps
    gpu = e0.elapsed_time(e1) / steps if dev.type == "cuda" else float("nan")
    with _OpCounter() as counter:
        _drain(batch)
    ops = counter.n
    kernels, top_rows = float("nan"), []
    if dev.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            _drain(batch)
            sync(dev)
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = len(evs)
        by = {}
        for e in evs:
            by.setdefault(e.name, [0, 0.0])
            by[e.name][0] += 1
            by[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        top_rows = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(case=f"{n} x {mode}", host_ms=host_ms,
                wall_ms=1e3 * wall, gpu_ms=gpu, kernels=kernels, ops=ops, top=top_rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cases", default="1:dual,1:none,64:dual", help="n:mode,...")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       (args.device if args.device != "auto" else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = args.shape or ("8b" if dev.type == "cuda" else "tiny")
    bundle = build_random(shape, dev, dtype)
    P, G, B = (128, 256, 32) if shape == "8b" else (16, 32, 8)
    rnd = random.Random(0)
    # Each case's row as soon as it is measured (a run stopped at its limit keeps them).
    print(f"profile: {shape} shape, {str(dtype)[6:]}, prompt {P}, gen {G}, block {B}, "
          f"graphs {'on' if args.cuda_graphs else 'off'}, "
          f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}", flush=True)
    print("| case | host ms/step | wall ms/step | GPU ms/step | kernels/step | ops/step |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = []
    for spec in args.cases.split(","):
        n, mode = spec.split(":")
        r = profile_case(bundle, int(n), mode, P, G, B, args.steps, rnd,
                         graphs=None if args.cuda_graphs else False)
        rows.append(r)
        print(f"| {r['case']} | {r['host_ms']:.2f} | {r['wall_ms']:.2f} | {r['gpu_ms']:.2f} | "
              f"{r['kernels']} | {r['ops']} |", flush=True)
    for r in rows:
        if r["top"]:
            print(f"top kernels, {r['case']} (count, total us):")
            for name, (c, us) in r["top"]:
                print(f"  {c:5d} {us:10.1f}  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
