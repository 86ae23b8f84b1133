"""The grouped MoE feed-forward: Triton kernels against the per-expert loop, with the weights-read floor.

    python -m bench.bench_moe                          # CUDA, bf16, LLaDA2-mini and LLaDA-MoE layer shapes
    python -m bench.bench_moe --device cpu --quick     # the CPU smoke run (a test runs it): the loop only

One MoE layer's routed experts (no router, no shared expert) for a range of token counts (one
request's 32-token block up to many requests' blocks), routing drawn uniformly at random. Columns:
ms of `kernels.moe.moe_ffn_reference` (one pair of products per expert that has tokens, the
baseline), ms of `kernels.moe_triton.moe_ffn_triton`, their ratio, and the floor: the bytes of the
experts actually chosen, read once, at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernels.moe import moe_ffn_reference

# (hidden, expert width, experts, chosen per token) of one MoE layer.
SHAPES = {"llada2-mini": (2048, 512, 256, 8), "llada2-flash": (4096, 1024, 256, 8),
          "llada-moe": (2048, 1024, 64, 8), "tiny": (64, 32, 16, 4)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps):
    fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def bandwidth(dev) -> float:
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / timed(lambda: b.copy_(a), dev, 10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable")
    ap.add_argument("--quick", action="store_true", help="the tiny shape, few token counts (CPU smoke run)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    shapes = args.shape or (["tiny"] if args.quick else ["llada2-mini", "llada-moe"])
    counts = [1, 32, 256] if args.quick else [32, 256, 1024, 4096]
    kernel = None
    if dev.type == "cuda":
        from kernels.moe_triton import moe_ffn_triton as kernel
    bw = bandwidth(dev)
    reps = 3 if args.quick else 20
    rows = []
    for name in shapes:
        d, f, e, k = SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        gate_up = torch.randn(e, 2 * f, d, device=dev, generator=gen).to(dtype) * d ** -0.5
        down = torch.randn(e, d, f, device=dev, generator=gen).to(dtype) * f ** -0.5
        for t in counts:
            x = torch.randn(t, d, device=dev, generator=gen).to(dtype)
            ids = torch.rand(t, e, device=dev, generator=gen).topk(k, dim=-1).indices
            w = torch.rand(t, k, device=dev, generator=gen)
            loop = timed(lambda: moe_ffn_reference(x, ids, w, gate_up, down), dev, reps)
            used = int(torch.unique(ids).numel())
            floor = used * 3 * d * f * gate_up.element_size() / bw
            row = dict(shape=name, tokens=t, experts_used=used, loop_ms=round(loop * 1e3, 3),
                       kernel_ms=None, kernel_vs_loop=None, floor_ms=round(floor * 1e3, 3), kernel_vs_floor=None)
            if kernel is not None:
                ms = timed(lambda: kernel(x, ids, w, gate_up, down), dev, reps)
                row.update(kernel_ms=round(ms * 1e3, 3), kernel_vs_loop=round(loop / ms, 2),
                           kernel_vs_floor=round(ms / floor, 2))
            rows.append(row)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (the kernel needs CUDA)"
    print(f"device: {name}; {str(dtype)[6:]}; copy bandwidth {bw / 1e9:.1f} GB/s")
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
