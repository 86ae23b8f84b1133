"""Benchmark of the Triton kernels against their PyTorch baselines, as one table.

On CUDA (LLaDA-8B shapes: 32 heads of 128):

- attention on dense batches (sequence 512..4096) against SDPA's flash backend, on the same
  tensors viewed as [B, H, L, D];
- attention on a ragged batch (lengths 64..2048, packed) against SDPA on the batch padded to its
  longest sequence: unmasked on the flash backend (the cost of padding alone; its results for
  padded sequences are wrong) and with a key-padding mask (what a correct padded server runs);
- block attention (32 block queries of each request over its cached keys), the cache modes' shape;
- sampling filters and commit-time logprobs: what they add to the fused sample on the same shape
  (the rows "select filters" and "logprobs"; "ours vs this" there is the filtered or logprobs path's
  time over the plain fused sample's);
- selection (64 requests x 32 block positions x 126,464 vocabulary, bf16 logits) at temperature 0
  and 1: the reference path (float64 softmax, gather, per-request top-k loop), a vectorised PyTorch
  version (fp32 log-sum-exp, argmax, the same counter-based noise, sort-based transfer), and one
  read of the logits at the measured device copy bandwidth.

Timing: warm-up calls (they also run Triton's autotuning), then CUDA events around bursts of
back-to-back calls, the median of --reps bursts per call (see `timed`). Every kernel's output is checked against its baseline in the same run
(column `check`).

Without CUDA the same code runs tiny shapes (kernels under the Triton interpreter) as a smoke test:
`python -m bench.bench_kernels --smoke`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from kernels import rng  # noqa: E402
from kernels.selection import (  # noqa: E402
    sample_candidates_reference,
    transfer_mask_loop,
    transfer_mask_reference,
)

NEG_INF = float("-inf")
# Largest acceptable |ours - baseline| on attention outputs, by dtype.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------------------------------------
# Timing


def timed(fn, reps, warmup):
    """Median milliseconds of `fn()`.

    On CUDA: CUDA events around a burst of back-to-back calls (enough for about 2 ms of work, at
    most 20), so Python launch overhead overlaps the device work of earlier calls as it does in a
    serving loop; the median over `reps` bursts, divided by the burst length. Elsewhere: wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    if CUDA:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6)
        burst = int(min(20, max(1, 2e-3 // est)))
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / burst)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes, reps, warmup):
    """Device copy bandwidth in bytes/s, counting the read and the write."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps, warmup)
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def g3(x):
    """Three significant digits."""
    return f"{x:.3g}"


SDPA = "SDPA (flash)" if CUDA else "SDPA (CPU)"


class Table:
    """The result table; each row is also printed as soon as it is measured (`live`), so a run
    stopped at its time limit keeps what it measured."""

    def __init__(self, live=True):
        self.rows = []
        self.failures = []
        self.live = live

    def expect(self, ok, what):
        if not ok:
            self.failures.append(what)

    def add(self, bench, shape, impl, ms, rate="", vs="", check=""):
        self.rows.append([bench, shape, impl, f"{ms:.3f}" if ms is not None else "-", rate, vs,
                          check])
        if self.live:
            print("row: " + " | ".join(str(c) for c in self.rows[-1]), flush=True)

    def render(self, title):
        head = ["benchmark", "shape", "implementation", "ms (median)", "rate", "ours vs this",
                "check"]
        widths = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(len(head))]

        def line(cells):
            return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

        out = [title, "", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def ratio(ours, other):
    """'0.83x' means ours takes 0.83 of the other's time (below 1 is faster)."""
    return f"{ours / other:.2f}x" if other else "-"


# ---------------------------------------------------------------------------------------------
# Attention


def _sdpa(q4, k4, v4, mask=None, flash=False):
    f = torch.nn.functional.scaled_dot_product_attention
    if flash and CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return f(q4, k4, v4, attn_mask=mask)
    return f(q4, k4, v4, attn_mask=mask)


def bench_attention(table, cfg, device, dtype):
    from kernels.attention_triton import attention_triton

    h, d = cfg.heads, cfg.head_dim
    gen = torch.Generator(device="cpu").manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # Dense: every sequence the same length, packed [B*L, H, D]; SDPA reads [B, H, L, D] views.
    for seq in cfg.dense_lengths:
        b = max(1, cfg.dense_tokens // seq)
        q, k, v = rand(b * seq, h, d), rand(b * seq, h, d), rand(b * seq, h, d)
        cu = torch.arange(0, b * seq + 1, seq, dtype=torch.int32, device=device)
        ks, kl = cu[:-1].clone(), torch.full((b,), seq, dtype=torch.int32, device=device)

        def ours():
            return attention_triton(q, k, v, cu, ks, kl, seq, seq, None)

        def view(t):
            return t.view(b, seq, h, d).transpose(1, 2)

        def flash():
            return _sdpa(view(q), view(k), view(v), flash=True)

        flops = 4.0 * b * h * seq * seq * d
        t_ours = timed(ours, cfg.reps, cfg.warmup)
        t_sdpa = timed(flash, cfg.reps, cfg.warmup)
        err = (ours().float() - flash().transpose(1, 2).reshape(b * seq, h, d).float()).abs().max()
        shape = f"B={b} L={seq} H={h} D={d}"
        table.expect(err < TOL[dtype], f"attn dense L={seq}: max|diff| {err:.2e}")
        table.add("attn dense", shape, "triton (ours)", t_ours, f"{g3(flops / t_ours / 1e9)} TFLOP/s")
        table.add("attn dense", shape, SDPA, t_sdpa, f"{g3(flops / t_sdpa / 1e9)} TFLOP/s",
                  ratio(t_ours, t_sdpa), f"max|diff| {err:.1e}")

    # Ragged: mixed lengths, packed for ours, padded for SDPA.
    lens = cfg.ragged_lengths
    b, lmax, tot = len(lens), max(lens), sum(lens)
    q, k, v = rand(tot, h, d), rand(tot, h, d), rand(tot, h, d)
    cu_list = [0]
    for n in lens:
        cu_list.append(cu_list[-1] + n)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    ks, kl = cu[:-1].clone(), torch.tensor(lens, dtype=torch.int32, device=device)

    def pad(t):
        out = torch.zeros(b, lmax, h, d, dtype=dtype, device=device)
        for i, n in enumerate(lens):
            out[i, :n] = t[cu_list[i]:cu_list[i + 1]]
        return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    keep = torch.zeros(b, 1, 1, lmax, dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        keep[i, ..., :n] = True

    def ours_r():
        return attention_triton(q, k, v, cu, ks, kl, lmax, lmax, None)

    def padded_flash():
        return _sdpa(qp, kp, vp, flash=True)

    def padded_masked():
        return _sdpa(qp, kp, vp, mask=keep)

    useful = 4.0 * h * d * sum(n * n for n in lens)
    t_ours = timed(ours_r, cfg.reps, cfg.warmup)
    t_pf = timed(padded_flash, cfg.reps, cfg.warmup)
    t_pm = timed(padded_masked, cfg.reps, cfg.warmup)
    got = ours_r().float()
    ref = padded_masked().transpose(1, 2).float()
    err = max(float((got[cu_list[i]:cu_list[i + 1]] - ref[i, :n]).abs().max())
              for i, n in enumerate(lens))
    shape = f"B={b} L={min(lens)}..{lmax} ({tot} tok)"
    table.expect(err < TOL[dtype], f"attn ragged: max|diff| {err:.2e}")
    table.add("attn ragged", shape, "triton (ours), packed", t_ours,
              f"{g3(useful / t_ours / 1e9)} TFLOP/s useful")
    table.add("attn ragged", shape, SDPA + ", padded (no mask)", t_pf,
              f"{g3(useful / t_pf / 1e9)} TFLOP/s useful", ratio(t_ours, t_pf), "(wrong on pads)")
    table.add("attn ragged", shape, "SDPA padded + key mask", t_pm,
              f"{g3(useful / t_pm / 1e9)} TFLOP/s useful", ratio(t_ours, t_pm), f"max|diff| {err:.1e}")

    # Block attention (cache modes): each request's block queries over its cached keys.
    nb, blk, ctx = cfg.block_batch, cfg.block_len, cfg.block_ctx
    kv_rows = nb * ctx
    q, k, v = rand(nb * blk, h, d), rand(kv_rows, h, d), rand(kv_rows, h, d)
    cu = torch.arange(0, nb * blk + 1, blk, dtype=torch.int32, device=device)
    ks = torch.arange(0, kv_rows, ctx, dtype=torch.int32, device=device)
    kl = torch.full((nb,), ctx, dtype=torch.int32, device=device)

    def ours_b():
        return attention_triton(q, k, v, cu, ks, kl, blk, ctx, None)

    def sdpa_b():
        return _sdpa(q.view(nb, blk, h, d).transpose(1, 2), k.view(nb, ctx, h, d).transpose(1, 2),
                     v.view(nb, ctx, h, d).transpose(1, 2), flash=True)

    t_ours = timed(ours_b, cfg.reps, cfg.warmup)
    t_sdpa = timed(sdpa_b, cfg.reps, cfg.warmup)
    err = (ours_b().float() - sdpa_b().transpose(1, 2).reshape(nb * blk, h, d).float()).abs().max()
    kv_bytes = 2 * kv_rows * h * d * q.element_size()
    shape = f"B={nb} q={blk} k={ctx}"
    table.expect(err < TOL[dtype], f"attn block: max|diff| {err:.2e}")
    table.add("attn block/cache", shape, "triton (ours)", t_ours,
              f"{g3(kv_bytes / t_ours / 1e6)} GB/s of K+V")
    table.add("attn block/cache", shape, SDPA, t_sdpa,
              f"{g3(kv_bytes / t_sdpa / 1e6)} GB/s of K+V", ratio(t_ours, t_sdpa),
              f"max|diff| {err:.1e}")


# ---------------------------------------------------------------------------------------------
# Selection


def select_reference(logits, temp, seed, nonce, pos, ban, cu_rows, k, thr):
    """The reference path: float64 softmax, gather, per-request top-k loop."""
    x0, conf = sample_candidates_reference(logits, temp, seed, nonce, pos, ban)
    return x0, conf, transfer_mask_loop(conf, cu_rows, k, thr)


def select_vectorised(logits, temp, seed, nonce, pos, ban, cu_rows, k, thr, hot):
    """A vectorised PyTorch version: fp32, one log-sum-exp, argmax, the same noise bits, sort."""
    l = logits.float()
    if ban:
        l[:, list(ban)] = NEG_INF
    lse = torch.logsumexp(l, dim=-1)
    if hot:  # every row hot in this benchmark: noise for the whole batch, no host sync
        key = rng.row_key(seed, nonce, pos).unsqueeze(1)
        tokens = torch.arange(l.shape[1], device=l.device, dtype=torch.int64).unsqueeze(0)
        u = (rng.bits(key, tokens).float() + 0.5) * (1.0 / 4294967296.0)
        x0 = torch.argmax(l - temp.unsqueeze(1) * torch.log(-torch.log(u)), dim=-1)
    else:
        x0 = torch.argmax(l, dim=-1)
    conf = torch.exp(l.gather(1, x0.unsqueeze(1)).squeeze(1) - lse)
    return x0, conf, transfer_mask_reference(conf, cu_rows, k, thr)


def bench_selection(table, cfg, device, read_bw):
    from kernels.selection_triton import sample_candidates_triton, transfer_mask_triton

    reqs, blk, vocab = cfg.sel_requests, cfg.sel_block, cfg.sel_vocab
    n = reqs * blk
    gen = torch.Generator(device="cpu").manual_seed(99)
    # Logits with an LM-like spread: a few strong tokens per row over a wide tail.
    logits = (torch.randn(n, vocab, generator=gen) * 2.0).to(device=device, dtype=cfg.sel_dtype)
    hot_tok = torch.randint(0, vocab, (n, 4), generator=gen).to(device)
    logits.scatter_(1, hot_tok, torch.full((n, 4), 12.0, device=device, dtype=cfg.sel_dtype))
    seed = torch.randint(0, 2**62, (n,), generator=gen).to(device)
    nonce = torch.full((n,), 7, dtype=torch.int64, device=device)
    pos = torch.arange(n, dtype=torch.int64, device=device) % blk
    cu_rows = torch.arange(0, n + 1, blk, dtype=torch.int64, device=device)
    k = torch.full((reqs,), max(1, blk // 8), dtype=torch.int64, device=device)
    thr = torch.zeros(reqs, dtype=torch.float32, device=device)
    thr[::4] = 0.9  # a quarter of the requests use the threshold rule
    ban = cfg.sel_ban
    nbytes = logits.numel() * logits.element_size()
    t_read = nbytes / read_bw * 1e3
    shape = f"{reqs}x{blk} rows x {vocab} {str(cfg.sel_dtype).replace('torch.', '')}"

    for t_val in (0.0, 1.0):
        temp = torch.full((n,), t_val, dtype=torch.float32, device=device)
        hot = t_val > 0

        def ours():
            x0, conf = sample_candidates_triton(logits, temp, seed, nonce, pos, ban)
            return x0, conf, transfer_mask_triton(conf, cu_rows, k, thr)

        def vec():
            return select_vectorised(logits, temp, seed, nonce, pos, ban, cu_rows, k, thr, hot)

        def ref():
            return select_reference(logits, temp, seed, nonce, pos, ban, cu_rows, k, thr)

        t_ours = timed(ours, cfg.reps, cfg.warmup)
        t_vec = timed(vec, cfg.reps, cfg.warmup)
        t_ref = timed(ref, max(1, cfg.reps // 4), min(1, cfg.warmup))
        ox, oc, om = ours()
        rx, rc, rm = ref()
        vx, _, _ = vec()
        mism = int((ox != rx).sum())
        vmism = int((vx != rx).sum())
        rel = float(((oc.double() - rc.double()).abs() / rc.double().clamp_min(1e-30)).max())
        mask_diff = int((om != rm).sum())
        bench = f"select T={t_val:g}"
        # At T > 0 a float32-vs-float64 near-tie of two noisy scores may flip a rare row.
        table.expect(mism <= (0 if t_val == 0 else max(1, n // 1000)), f"{bench}: {mism} tokens")
        table.expect(mask_diff == 0 or mism > 0, f"{bench}: {mask_diff} mask rows")
        table.expect(rel < 1e-4, f"{bench}: conf rel err {rel:.2e}")
        gbs = f"{g3(nbytes / t_ours / 1e6)} GB/s of logits"
        table.add(bench, shape, "triton (ours): sample + transfer", t_ours, gbs, "",
                  f"tokens != ref: {mism}, conf rel {rel:.1e}, mask != ref: {mask_diff}")
        table.add(bench, shape, "vectorised PyTorch", t_vec, "", ratio(t_ours, t_vec),
                  f"tokens != ref: {vmism}")
        table.add(bench, shape, "reference (fp64, top-k loop)", t_ref, "", ratio(t_ours, t_ref))
        table.add(bench, shape, "one read of the logits", t_read,
                  f"at {g3(read_bw / 1e9)} GB/s copy bw", ratio(t_ours, t_read))
    # Transfer decision alone (the second kernel), for the record.
    conf = torch.rand(n, device=device)
    t_tk = timed(lambda: transfer_mask_triton(conf, cu_rows, k, thr), cfg.reps, cfg.warmup)
    t_tr = timed(lambda: transfer_mask_reference(conf, cu_rows, k, thr), cfg.reps, cfg.warmup)
    t_tl = timed(lambda: transfer_mask_loop(conf, cu_rows, k, thr), max(1, cfg.reps // 4),
                 min(1, cfg.warmup))
    same = bool(torch.equal(transfer_mask_triton(conf, cu_rows, k, thr),
                            transfer_mask_reference(conf, cu_rows, k, thr)))
    tshape = f"{reqs} requests x {blk} rows"
    table.expect(same, "transfer mask differs from the sort reference")
    table.add("transfer mask", tshape, "triton (ours)", t_tk, "", "", f"equal to sort: {same}")
    table.add("transfer mask", tshape, "PyTorch sort (vectorised)", t_tr, "", ratio(t_tk, t_tr))
    table.add("transfer mask", tshape, "per-request top-k loop", t_tl, "", ratio(t_tk, t_tl))


def bench_filters_logprobs(table, cfg, device):
    """What sampling filters and commit-time logprobs add to a step's selection, same shape as the
    selection rows at T=1: the plain fused sample against (a) the filters' restriction in front of
    it, (b) the log-softmax + top-20 alternatives a logprobs request adds (every row of the step)."""
    from kernels.selection import RowFilters, apply_filters
    from kernels.selection_triton import sample_candidates_triton

    reqs, blk, vocab = cfg.sel_requests, cfg.sel_block, cfg.sel_vocab
    n = reqs * blk
    gen = torch.Generator(device="cpu").manual_seed(7)
    logits = (torch.randn(n, vocab, generator=gen) * 2.0).to(device=device, dtype=cfg.sel_dtype)
    seed = torch.randint(0, 2**62, (n,), generator=gen).to(device)
    nonce = torch.full((n,), 3, dtype=torch.int64, device=device)
    pos = torch.arange(n, dtype=torch.int64, device=device) % blk
    temp = torch.ones(n, dtype=torch.float32, device=device)
    filt = RowFilters(torch.full((n,), 50, dtype=torch.int64, device=device),
                      torch.full((n,), 0.9, dtype=torch.float64, device=device),
                      torch.full((n,), 0.05, dtype=torch.float64, device=device))
    shape = f"{reqs}x{blk} rows x {vocab} {str(cfg.sel_dtype).replace('torch.', '')}, T=1"
    top_n = min(20, vocab)

    def plain():
        return sample_candidates_triton(logits, temp, seed, nonce, pos, None)

    def filtered():
        return sample_candidates_triton(apply_filters(logits, temp, filt), temp, seed, nonce, pos, None)

    def logprobs():
        lp = torch.log_softmax(logits.float(), dim=-1)
        x0, _ = plain()
        return lp.gather(1, x0.unsqueeze(1)).squeeze(1), torch.topk(lp, top_n, dim=-1)

    t_plain = timed(plain, cfg.reps, cfg.warmup)
    t_filt = timed(filtered, cfg.reps, cfg.warmup)
    t_lp = timed(logprobs, cfg.reps, cfg.warmup)
    fx, fc = filtered()
    kept = torch.topk(logits.float(), 50, dim=-1).indices
    inside = bool((kept == fx.unsqueeze(1)).any(dim=1).all())
    table.expect(inside and bool((fc > 0).all()), "select filters: a candidate outside the kept set")
    chosen_lp, top = logprobs()
    ok = bool(torch.equal(top.indices[:, 0], logits.float().argmax(-1))) and bool((chosen_lp <= 0).all())
    table.expect(ok, "logprobs: top-1 is not the argmax")
    table.add("select filters", shape, "fused sample, no filters", t_plain)
    table.add("select filters", shape, "top_k 50 + top_p 0.9 + min_p 0.05, then fused sample", t_filt,
              "", ratio(t_filt, t_plain), f"candidates inside the kept set: {inside}")
    table.add("logprobs", shape, f"fused sample + log-softmax + top-{top_n}", t_lp, "",
              ratio(t_lp, t_plain), f"top-1 == argmax: {ok}")


def autotune_report():
    """The configurations Triton's autotuner picked, per key (for the record next to the table)."""
    import kernels.attention_triton as at
    import kernels.selection_triton as st

    lines = ["autotuned configurations:"]
    for name, tuner in (("attention", at._attn_fwd_tuned), ("sample", st._sample_tuned)):
        for key, cfg in (getattr(tuner, "cache", None) or {}).items():
            lines.append(f"  {name} {key}: {cfg}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


class Config:
    def __init__(self, smoke, reps):
        if smoke:
            self.heads, self.head_dim = 2, 32
            self.dense_lengths = [16, 40]
            self.dense_tokens = 80
            self.ragged_lengths = [5, 33, 1, 20]
            self.block_batch, self.block_len, self.block_ctx = 2, 8, 24
            self.sel_requests, self.sel_block, self.sel_vocab = 2, 3, 300
            self.sel_dtype = torch.float16
            self.reps, self.warmup = 1, 0
        else:
            self.heads, self.head_dim = 32, 128
            self.dense_lengths = [512, 1024, 2048, 4096]
            self.dense_tokens = 16384
            gen = torch.Generator().manual_seed(5)
            self.ragged_lengths = [64, 2048] + torch.randint(64, 2049, (14,), generator=gen).tolist()
            self.block_batch, self.block_len, self.block_ctx = 64, 32, 384
            self.sel_requests, self.sel_block, self.sel_vocab = 64, 32, 126464
            self.sel_dtype = torch.bfloat16
            self.reps, self.warmup = reps, 3
        self.sel_ban = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (forced without CUDA)")
    ap.add_argument("--only", choices=["attention", "selection"], default=None)
    ap.add_argument("--reps", type=int, default=15, help="timed calls per measurement (median)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="attention dtype")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)

    smoke = args.smoke or not CUDA
    device = "cuda" if CUDA else "cpu"
    cfg = Config(smoke, args.reps)
    if CUDA:
        name = torch.cuda.get_device_name()
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    else:
        name = f"CPU (no CUDA; Triton interpreter; {os.cpu_count()} cores)"
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32  # interpreter: no bf16
    import triton

    t0 = time.perf_counter()
    table = Table()
    read_bw = copy_bandwidth(device, (1 << 30) if not smoke else (1 << 20), cfg.reps, cfg.warmup)
    table.add("device copy", "1 GiB" if not smoke else "1 MiB", "tensor.copy_ (read + write)",
              None, f"{g3(read_bw / 1e9)} GB/s")
    if args.only in (None, "attention"):
        bench_attention(table, cfg, device, dtype)
    if args.only in (None, "selection"):
        bench_selection(table, cfg, device, read_bw)
        bench_filters_logprobs(table, cfg, device)
    title = (f"llada-serve kernels on {name} (torch {torch.__version__}, triton {triton.__version__},"
             f" attention {str(dtype).replace('torch.', '')}{', SMOKE shapes' if smoke else ''};"
             f" 'ours vs this' = our time / its time)")
    text = table.render(title)
    if CUDA:
        text += "\n\n" + autotune_report()
    print(text)
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    for f in table.failures:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 1 if table.failures else 0


if __name__ == "__main__":
    sys.exit(main())
