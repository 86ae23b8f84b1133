"""What commit-time logprobs and sampling filters cost a batched step, and that requests which ask
for neither pay nothing for them.

    python -m bench.bench_logprobs                 # CPU: a random model with a 32k vocabulary
    python -m bench.bench_logprobs --quick         # smaller (a test runs it)
    python -m bench.bench_logprobs --device cuda   # GPU: bf16, the 8B vocabulary (126,464), d_model 1024

One process, one random model, the same 16 requests (prompt 32, one block of 32, 32 steps) through
the batch's step (`LLaDABatch.launch` + `collect`), the median over steps of the same step index, in these configurations:

- baseline: no request asks for logprobs or filters (the step's bucket has neither);
- the same requests with `logprobs=None` spelled out and filters at their neutral values (top_k 0,
  top_p 1, min_p 0): nothing to compute, so the same step as the baseline (ratio 1.00x expected);
- one of the 16 asks for logprobs (5 alternatives): the step computes a log-softmax and the top 20
  of that request's rows (every row on CUDA, at fixed shapes) and reads them back (what sharing a
  step with a logprobs request costs its batchmates);
- every request asks for logprobs;
- one request samples (temperature 1) without filters, then the same with filters (top_k 50,
  top_p 0.9): the difference between the two is the filters' own cost (off CUDA the restriction
  runs on the filtered rows only; on CUDA on every row).
Ratios are to the baseline. On the GPU the kernel-level costs are rows of bench.bench_kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.bench_engine import Bundle
from sampler.params import SamplingParams
from sampler.strategies import make_batch
from weights.checkpoint import SpecialIds
from weights.config_llada import LLaDAConfig
from weights.model_llada import LLaDAModel


def build(vocab: int, d_model: int, device: str = "cpu", dtype=torch.float32) -> Bundle:
    cfg = LLaDAConfig(d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=2 * d_model,
                      vocab_size=vocab, embedding_size=vocab, max_sequence_length=1024,
                      mask_token_id=vocab - 10, eos_token_id=vocab - 9, pad_token_id=vocab - 9)
    model = LLaDAModel(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05, generator=gen)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Bundle(model, cfg, SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id))


def run(bundle, params: list[SamplingParams], prompt_len: int, steps: int) -> tuple[float, int]:
    """(median ms per step, bytes read back per step) for one batch of requests."""
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=len(params) * 128,
                       max_requests=len(params))
    vocab = bundle.config.vocab_size - 10
    for i, sp in enumerate(params):
        batch.add(i, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), sp)
    times, nbytes = [], 0
    cuda = bundle.model.device.type == "cuda"
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched = batch.launch()
        batch.collect(launched)  # waits for the step's results
        times.append((time.perf_counter() - t0) * 1e3)
        nbytes = launched.nbytes
    return statistics.median(times[1:]), nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 4k vocabulary and 8 steps")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.device.startswith("cuda"):
        vocab, d_model, steps, dtype = 126464, 1024, 32, torch.bfloat16
    else:
        vocab, d_model, steps, dtype = (4096, 64, 8, torch.float32) if args.quick else (32768, 128, 32, torch.float32)
    bundle = build(vocab, d_model, args.device, dtype)
    n, gen = args.requests, 32
    base = SamplingParams(gen_length=gen, steps=min(steps, gen))
    neutral = SamplingParams(gen_length=gen, steps=min(steps, gen), top_k=0, top_p=1.0, min_p=0.0, logprobs=None)
    lp = SamplingParams(gen_length=gen, steps=min(steps, gen), logprobs=5)
    sampled = SamplingParams(gen_length=gen, steps=min(steps, gen), temperature=1.0, seed=3)
    filt = SamplingParams(gen_length=gen, steps=min(steps, gen), temperature=1.0, seed=3, top_k=50, top_p=0.9)
    configs = [
        ("baseline: no logprobs, no filters", [base] * n),
        ("neutral fields spelled out", [neutral] * n),
        (f"1 of {n} asks for logprobs", [lp] + [base] * (n - 1)),
        (f"all {n} ask for logprobs", [lp] * n),
        (f"1 of {n} samples, no filters", [sampled] + [base] * (n - 1)),
        (f"1 of {n} samples with filters", [filt] + [base] * (n - 1)),
    ]
    # Rounds interleave the configurations, so a busy machine slows them alike; median over rounds.
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, params in configs:
            ms, sizes[name] = run(bundle, params, 32, min(steps, gen))
            times[name].append(ms)
    rows = [(name, statistics.median(times[name]), sizes[name]) for name, _ in configs]
    t0 = rows[0][1]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "the CPU, 1 thread"
    print(f"step cost on {where} (torch {torch.__version__}): {n} requests, prompt 32, one block "
          f"of {gen}, vocabulary {vocab}, d_model {d_model}; median ms per step over {min(steps, gen)} steps, median of {args.rounds} interleaved rounds")
    print()
    print("| configuration | ms / step | vs baseline | bytes read back / step |")
    print("|---|---|---|---|")
    for name, ms, nbytes in rows:
        print(f"| {name} | {ms:.2f} | {ms / t0:.2f}x | {nbytes} |")
    ok = rows[1][2] == rows[0][2] and rows[2][2] > rows[0][2]
    if not ok:
        print("CHECK FAILED: the read-back sizes do not show logprobs computed only when asked for",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
