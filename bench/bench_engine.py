"""End-to-end sampler throughput: our batched engine against the straightforward reference.

    python -m bench.bench_engine                      # CUDA: random LLaDA-8B-shaped model in bf16
    python -m bench.bench_engine --model DIR          # a real checkpoint
    python -m bench.bench_engine --device cpu --shape tiny --quick   # the CPU smoke run (a test runs it)
    python -m bench.bench_engine --shape llada2-mini  # CUDA: LLaDA2-mini's shape (16B MoE), block diffusion
    python -m bench.bench_engine --shape llada-moe    # CUDA: LLaDA-MoE-7B-A1B's shape, the LLaDA sampler

Every configuration runs through `make_batch`'s batch, the step the server's engine calls (no HTTP),
and the baseline (sampler.reference: full recompute every step, eager, float64 softmax, per-row
top-k loop, one request at a time) runs in the same process. The table gives tokens/s, ms per
forward, forwards per token, peak GPU memory, the ratio to the baseline and to the roofline
(weights bytes / measured copy bandwidth, or FLOPs / measured matmul rate when that is larger).
Speed of a fixed schedule does not depend on the weights, so random weights are fine for it.
Drafting rows run with the batch's draft gate at the server's default (on for a CPU: draft rows
only while the timed steps say they pay; `sampler.draft_gate`); the `gate` column counts the timed
steps it ran drafting and plain, and `draft_rows_per_forward` how much drafting actually ran.

MoE shapes (`llada2-mini`, `llada-moe`; `llada2-tiny`, `llada-moe-tiny` on the CPU): the roofline
reads the active parameters only (the chosen experts of one token; a batch touches more of them).
On a LLaDA2 shape the table is block diffusion's: LLaDA2.0 with threshold 0.95 at batch 1 and many,
LLaDA2.1 with editing, against `sampler.reference_llada2` (full recompute of the block-causal
window every step) as the baseline. With random weights confidences are low, so threshold decoding
unmasks about the schedule's minimum per step (one token with block 32 and 32 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import torch

from sampler.draft_gate import gate_for
from sampler.params import SamplingParams
from sampler.reference import reference_generate
from sampler.reference_llada2 import llada2_generate
from sampler.strategies import make_batch, rows_needed
from weights.checkpoint import SpecialIds, build_network, load_checkpoint, pick_cpu_threads
from weights.config_llada import LLaDAConfig
from weights.family import config_from_dict

SHAPES = {
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
               vocab_size=126464, embedding_size=126464, max_sequence_length=4096,
               mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, rope_theta=500000.0),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128,
                 vocab_size=512, embedding_size=512, max_sequence_length=2048,
                 mask_token_id=500, eos_token_id=501, pad_token_id=501, rope_theta=500000.0),
}


# The MoE members as config.json would give them (released field names). LLaDA2-mini: LLaDA2.1-mini's
# config.json. LLaDA-MoE-7B-A1B: its config.json was not readable; 16 layers of 64 experts (top-8,
# width 1024) at hidden 2048 is the shape its name (7B total, about 1.4B active) implies.
_SPECIAL = dict(vocab_size=157184, max_position_embeddings=32768, eos_token_id=156892,
                pad_token_id=156892, mask_token_id=156895, rope_scaling=None, tie_word_embeddings=False)
_LLADA2 = dict(_SPECIAL, architectures=["LLaDA2MoeModelLM"], model_type="llada2_moe", head_dim=128,
               partial_rotary_factor=0.5, rope_theta=600000, rms_norm_eps=1e-6, first_k_dense_replace=1,
               num_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5)
_LLADA_MOE = dict(_SPECIAL, architectures=["LLaDAMoEModelLM"], model_type="llada", qk_layernorm=True,
                  partial_rotary_factor=1.0, rope_theta=50000, rms_norm_eps=1e-5)
MOE_SHAPES = {
    "llada2-mini": dict(_LLADA2, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                        num_key_value_heads=4, intermediate_size=5120, num_experts=256,
                        num_experts_per_tok=8, moe_intermediate_size=512),
    "llada2-tiny": dict(_LLADA2, vocab_size=512, eos_token_id=496, pad_token_id=496, mask_token_id=499,
                        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                        moe_intermediate_size=32, n_group=4, topk_group=2),
    "llada-moe": dict(_LLADA_MOE, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16, dense_intermediate_size=8192, expert_intermediate_size=1024,
                      shared_expert_intermediate_size=None, num_experts=64, num_experts_per_tok=8,
                      moe_layer_freq=[1] * 16),
    "llada-moe-tiny": dict(_LLADA_MOE, vocab_size=512, eos_token_id=496, pad_token_id=496, mask_token_id=499,
                           hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           dense_intermediate_size=128, expert_intermediate_size=32,
                           shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                           moe_layer_freq=[0, 1]),
}


class Bundle:
    def __init__(self, model, config, special, decoding="llada"):
        self.model, self.config, self.special, self.decoding = model, config, special, decoding


def build_random(shape: str, device: torch.device, dtype: torch.dtype, tp=None) -> Bundle:
    cfg = config_from_dict(MOE_SHAPES[shape]) if shape in MOE_SHAPES else LLaDAConfig(**SHAPES[shape])
    model = build_network(cfg, device, dtype, tp)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("expert_bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval().requires_grad_(False)
    decoding = "llada2.0" if cfg.block_diffusion else "llada"
    return Bundle(model, cfg, SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id), decoding)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_machine(device, dtype):
    """(copy bandwidth bytes/s counting read+write, matmul FLOP/s) measured here and now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    bw = 2 * n * reps / (time.perf_counter() - t)
    m = 8192 if device.type == "cuda" else 512
    x = torch.randn(m, m, device=device, dtype=dtype)
    y = x @ x
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        y = x @ x
    sync(device)
    flops = 2 * m ** 3 * reps / (time.perf_counter() - t)
    del a, b, x, y
    return bw, flops


@dataclass
class Result:
    name: str
    tokens: int
    seconds: float
    forwards: int
    tokens_in_forwards: int  # query tokens processed, for the FLOP roofline
    peak_bytes: int
    requests: int
    host_seconds: float = 0.0  # host time in the step calls, waiting for the device excluded
    draft_rows: int = 0        # draft rows forwarded (exact parallel decoding)
    graphs: str = "off"  # timed steps "replayed/eager/refused" (sampler.cuda_graphs), or "off"
    refused: int = 0     # timed steps whose bucket was refused capture (ran eagerly)
    gate: str = "off"    # timed steps the draft gate ran "drafting/plain" (sampler.draft_gate), or "off"


def run_batch(bundle, reqs, arrivals=None, max_requests=64, cuda_graphs=None, pipelined=None,
              warm_pass=None, draft_budget: int = 0, gate=None) -> Result:
    """Run (prompt, params) pairs through one batch; arrivals[i] = step at which i joins.

    The batch is the server's: with drafting requests its draft gate at its default (on for a
    CPU: draft rows only while the timed steps say they pay); `gate` replaces it (a gate that
    already served requests: the server's steady state). `Result.gate` counts the timed steps
    the gate ran drafting and plain.

    When the batch replays CUDA graphs the run goes twice through the same batch and the second is
    timed: the first captures the graphs of the buckets it meets (capture is a start-up cost, not a
    per-step one). An eager batch is timed on its first run (`warm_pass=True` forces the extra
    pass). `Result.graphs` counts the timed steps that replayed a graph, ran eagerly by design, or
    ran eagerly because their capture was refused."""
    dev = bundle.model.device
    blocks = bool(bundle.config.block_diffusion)
    rows = sum(rows_needed(len(p), sp, blocks) for p, sp in reqs)
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows,
                       max_requests=max(max_requests, 1), cuda_graphs=cuda_graphs, draft_budget=draft_budget)
    if gate is not None:
        batch.gate = gate
    pipelined = dev.type == "cuda" if pipelined is None else pipelined
    graphs = batch.graphs
    if warm_pass is None:
        warm_pass = graphs is not None
    if warm_pass:
        _drive(batch, reqs, arrivals, pipelined)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    before = graphs.counts() if graphs is not None else None
    forwards0, host0, drafts0 = batch.forwards, batch.host_seconds, getattr(batch, "draft_rows_run", 0)
    gate = getattr(batch, "gate", None)
    gate0 = dict(gate.steps) if gate is not None else None
    t = time.perf_counter()
    tokens, q_tokens = _drive(batch, reqs, arrivals, pipelined)
    sync(dev)
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    res = Result("", tokens, secs, batch.forwards - forwards0, q_tokens, peak, len(reqs),
                 batch.host_seconds - host0, getattr(batch, "draft_rows_run", 0) - drafts0)
    if gate is not None:
        res.gate = f"{gate.steps[True] - gate0[True]}/{gate.steps[False] - gate0[False]}"
    if graphs is not None:
        now = graphs.counts()
        d = {k: now[k] - before[k] for k in now}
        res.graphs = f"{d['replayed']}/{d['eager']}/{d['refused']}"
        res.refused = d["refused"]
    return res


def _drive(batch, reqs, arrivals, pipelined):
    arrivals = arrivals or [0] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: arrivals[i])
    step_no = done = tokens = q_tokens = 0
    while done < len(reqs):
        while order and arrivals[order[0]] <= step_no and batch.can_admit(len(reqs[order[0]][0]),
                                                                          reqs[order[0]][1]):
            i = order.pop(0)
            batch.add(i, *reqs[i])
        q_tokens += batch.planned_query_tokens()
        for ev in (batch.step_async() if pipelined else batch.step()):
            tokens += len(ev.positions)
            if ev.finished:
                batch.remove(ev.request_id)
                done += 1
        step_no += 1
    return tokens, q_tokens


def run_baseline(bundle, reqs) -> Result:
    dev = bundle.model.device
    sync(dev)
    t = time.perf_counter()
    tokens = forwards = q = 0
    for prompt, sp in reqs:
        if bundle.config.block_diffusion:  # every forward recomputes the window up to the block's end
            ids, fwd = llada2_generate(bundle.model, prompt, sp.for_block_diffusion(), bundle.special.mask,
                                       bundle.special.eos)
            ids = [t for t in ids if t != bundle.special.eos] or ids
        else:
            ids, fwd = reference_generate(bundle.model, prompt, sp, bundle.special.mask, bundle.special.stop)
        tokens += len(ids)
        forwards += fwd
        q += fwd * (len(prompt) + sp.gen_length)
    sync(dev)
    return Result("", tokens, time.perf_counter() - t, forwards, q, 0, len(reqs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES) + sorted(MOE_SHAPES),
                    help="random model shape")
    ap.add_argument("--model", default=None, help="checkpoint directory instead of random weights")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay captured CUDA graphs of the step (CUDA only; default on; off with "
                         "--tensor-parallel-size > 1)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="shard the model over N local ranks (one process each; rank 0 prints)")
    ap.add_argument("--no-eager-rows", dest="eager_rows", action="store_false",
                    help="leave out rows 2e and 3e (rows 2 and 3 eager and synchronous, CUDA only)")
    ap.add_argument("--full-row4", action="store_true",
                    help="row 4 at its original size: 64 requests, generations up to 1,024 (9.8 M "
                         "padded query tokens against the default's 1.4 M: over 4 minutes per pass "
                         "on an H200)")
    args = ap.parse_args(argv)
    if args.tensor_parallel_size > 1:
        from weights.parallel import run_ranks

        args.cuda_graphs = False  # the step with its collectives runs eagerly for now
        out = run_ranks(args.tensor_parallel_size, _rank, args)
        print(out, end="")
        return 0
    return _bench(args, None)


def _rank(tp, args) -> str:
    """One rank of a tensor-parallel run: every rank runs the benchmark, rank 0's output is kept."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _bench(args, tp)
    return buf.getvalue()


def _bench(args, tp) -> int:
    size = 1 if tp is None else tp.size

    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       (args.device if args.device != "auto" else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    shape = args.shape or ("8b" if dev.type == "cuda" else "tiny")
    if args.model:
        bundle = load_checkpoint(args.model, device=dev, dtype=dtype, tp=tp)
        label = args.model
    else:
        bundle = build_random(shape, dev, dtype, tp)
        label = f"random {shape} shape"
    if size > 1:
        label += f", tensor parallel {size} (per-rank figures)"
    cfg = bundle.config
    pick_cpu_threads(cfg, dev)  # one intra-op thread for small models on a CPU, as the server does
    weight_bytes = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
    active = cfg.active_parameters / cfg.num_parameters  # MoE: one token reads its experts only
    read_bytes = weight_bytes * active
    bw, flops = measure_machine(dev, dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"

    q = args.quick
    P, G, B = (16, 32, 8) if q else (128, 256, 32)
    n_many = 8 if q else 64
    vocab = cfg.vocab_size
    rnd = random.Random(0)

    def prompt(n=P):
        return [rnd.randrange(0, min(vocab, cfg.mask_token_id)) for _ in range(n)]

    one = lambda **kw: SamplingParams(gen_length=kw.pop("gen", G), block_length=B,
                                      steps=kw.pop("steps", None), **kw)
    # The machine first, then each row as soon as it is measured (and the JSON rewritten), so a
    # run stopped at its time limit keeps every row it finished.
    print(f"device: {name}; model: {label} ({cfg.family}, {cfg.num_parameters / 1e9:.2f}B params, "
          f"{cfg.active_parameters / 1e9:.2f}B active, {str(dtype)[6:]}); weights {weight_bytes / 1e9:.2f} GB, "
          f"read per token {read_bytes / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"matmul {flops / 1e12:.1f} TFLOP/s", flush=True)
    if cfg.block_diffusion:
        print(f"block diffusion: prompt {P}, gen {G}, block {B}, 32 steps per block", flush=True)
    else:
        print(f"prompt {P}, gen {G}, block {B}, one token per forward unless said; graphs = timed "
              f"steps replayed/eager/refused capture; gate = timed steps the draft gate ran "
              f"drafting/plain", flush=True)
    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
    rows = []
    meta = dict(device=name, model=label, dtype=str(dtype)[6:], copy_tb_s=round(bw / 1e12, 3),
                matmul_tflop_s=round(flops / 1e12, 1))

    def record(label_, res: Result, base: Result | None):
        tps = res.tokens / res.seconds
        per_fwd = res.seconds / max(res.forwards, 1)
        # Roofline of one forward: reading the weights once, or the FLOPs of the tokens it processes.
        avg_q = res.tokens_in_forwards / max(res.forwards, 1)
        floor = max(read_bytes / bw, 2 * cfg.active_parameters * avg_q / flops / size)
        roof_tps = (res.tokens / max(res.forwards, 1)) / floor
        row = dict(
            config=label_, requests=res.requests, tokens_per_s=round(tps, 1),
            ms_per_forward=round(per_fwd * 1e3, 2), forwards_per_token=round(res.forwards / max(res.tokens, 1), 3),
            peak_gib=round(res.peak_bytes / 2**30, 2),
            vs_baseline=round(tps / (base.tokens / base.seconds), 2) if base else None,
            vs_roofline=round(tps / roof_tps, 4), roofline_ms=round(floor * 1e3, 2),
            host_ms_per_step=round(res.host_seconds / max(res.forwards, 1) * 1e3, 3),
            draft_rows_per_forward=round(res.draft_rows / max(res.forwards, 1), 2), gate=res.gate,
            graphs=res.graphs, seconds=round(res.seconds, 2))
        rows.append(row)
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
        if res.refused:
            print(f"WARNING: {label_}: {res.refused} steps were refused capture and ran eagerly; "
                  f"this row is not a CUDA graph figure", flush=True)
        if args.json and (tp is None or tp.rank == 0):
            write_json(args.json, dict(meta, rows=rows, complete=False))

    if cfg.block_diffusion:
        n_bd = 8 if q else 32
        llada2_table(bundle, prompt, record, G, B, n_bd)
    else:
        llada_table(bundle, args, prompt, one, record, P, G, B, n_many, rnd, q, dev)
    print()
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(COLUMNS, widths)) + " |")
    if dev.type == "cuda":
        per_req = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * (P + G) * torch.finfo(dtype).bits // 8
        free = torch.cuda.mem_get_info()[0]
        print(f"KV rows per request (prompt {P} + gen {G}): {per_req / 2**20:.0f} MiB; "
              f"requests that fit in the free memory now: {free // per_req}")
    if args.json and (tp is None or tp.rank == 0):
        write_json(args.json, dict(meta, rows=rows, complete=True))
    refused = [r["config"] for r in rows if r["graphs"] != "off" and not r["graphs"].endswith("/0")]
    if refused:
        print(f"capture refused in: {', '.join(refused)}")
    return 0


COLUMNS = ["config", "requests", "tokens_per_s", "ms_per_forward", "host_ms_per_step",
           "forwards_per_token", "draft_rows_per_forward", "gate", "peak_gib", "vs_baseline", "vs_roofline",
           "roofline_ms", "graphs"]


def write_json(path, data) -> None:
    """Replace the file in one rename, so a reader (or a kill) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def llada2_table(bundle, prompt, record, G, B, n_many):
    """Block diffusion: LLaDA2.0 at threshold 0.95 (the released default) alone and batched,
    LLaDA2.1 with editing (0.9) alone and with requests joining, then drafting (depth 4)."""
    v20 = lambda: SamplingParams(gen_length=G, block_length=B, threshold=0.95)
    v21 = lambda: SamplingParams(gen_length=G, block_length=B, threshold=0.95, editing_threshold=0.9,
                                 max_post_steps=16)
    run_batch(bundle, [(prompt(), SamplingParams(gen_length=B, block_length=B, threshold=0.95))])  # warm-up
    base_req = [(prompt(), v20())]
    base = run_baseline(bundle, base_req)
    record("baseline: reference_llada2, batch 1, LLaDA2.0", base, None)
    warm = bundle.model.device.type == "cuda"  # no graphs here: the extra pass is the kernels' warm-up
    record("1. batch 1, LLaDA2.0, threshold 0.95", run_batch(bundle, base_req, warm_pass=warm), base)
    many = [(prompt(), v20()) for _ in range(n_many)]
    record(f"2. {n_many} requests, LLaDA2.0, threshold 0.95",
           run_batch(bundle, many, max_requests=n_many, warm_pass=warm), base)
    record("3. batch 1, LLaDA2.1, editing 0.9", run_batch(bundle, [(base_req[0][0], v21())], warm_pass=warm), base)
    mixed = [(prompt(), v21() if i % 2 else v20()) for i in range(n_many)]
    arrivals = sorted(random.Random(1).randrange(0, 2 * G) for _ in range(n_many))
    record(f"4. {n_many} requests, 2.0 and 2.1 mixed, joining",
           run_batch(bundle, mixed, arrivals, n_many, warm_pass=warm), base)
    # Exact parallel decoding (draft_depth 4): the same ids as 1 / 2 / 3, fewer forwards where the
    # guesses hold. Rows 5 and 6 have room for every draft; row 7 runs under the server's default
    # budget (2048 query tokens and pool rows per step), which a full batch mostly uses.
    if getattr(bundle.model, "tp", None) is not None:
        return  # requests run at draft depth 0 under tensor parallelism: drafting rows would repeat 1-4
    prompt_len = len(base_req[0][0])
    room = 5 * (prompt_len + G + B)
    record("5. batch 1, LLaDA2.0, threshold 0.95, draft depth 4",
           run_batch(bundle, [(base_req[0][0], replace(v20(), draft_depth=4))], warm_pass=warm,
                     draft_budget=room), base)
    record("6. batch 1, LLaDA2.1, editing 0.9, draft depth 4",
           run_batch(bundle, [(base_req[0][0], replace(v21(), draft_depth=4))], warm_pass=warm,
                     draft_budget=room), base)
    record(f"7. {n_many} requests, LLaDA2.0, draft depth 4, budget 2048",
           run_batch(bundle, [(p, replace(sp, draft_depth=4)) for p, sp in many], max_requests=n_many,
                     warm_pass=warm, draft_budget=2048), base)


def llada_table(bundle, args, prompt, one, record, P, G, B, n_many, rnd, q, dev):
    """The LLaDA sampler's six configurations (LLaDA-8B and LLaDA-MoE)."""
    # Warm-up (allocator, kernels' compilation).
    run_batch(bundle, [(prompt(), one(gen=B, steps=4, cache="dual"))])

    base_req = [(prompt(), one())]
    base = run_baseline(bundle, base_req)
    record("baseline: reference, batch 1, exact", base, None)
    graphs = None if args.cuda_graphs else False
    record("1. batch 1, exact (no cache)", run_batch(bundle, base_req, cuda_graphs=graphs), base)
    dual1 = [(base_req[0][0], one(cache="dual"))]
    record("2. batch 1, dual cache", run_batch(bundle, dual1, cuda_graphs=graphs), base)
    many = [(prompt(), one(cache="dual")) for _ in range(n_many)]
    record(f"3. {n_many} requests, dual cache", run_batch(bundle, many, max_requests=n_many,
                                                          cuda_graphs=graphs), base)
    if dev.type == "cuda" and args.eager_rows:  # the same two, eager and synchronous: what graphs
        # and overlap buy (timed on their first run: rows 2 and 3 already tuned these shapes)
        record("2e. as 2, eager, synchronous", run_batch(bundle, dual1, cuda_graphs=False,
                                                        pipelined=False), base)
        record(f"3e. as 3, eager, synchronous", run_batch(bundle, many, max_requests=n_many,
                                                          cuda_graphs=False, pipelined=False), base)
    # Row 4 sized for one GPU call by default (32 requests, generations up to 512: 1.4 M padded
    # query tokens against the original's 9.8 M); --full-row4 restores 64 requests up to 1,024.
    if q:
        n_mixed, lengths = n_many, [8, 16, 32, 64]
    elif args.full_row4:
        n_mixed, lengths = 64, [64, 128, 256, 512, 1024]
    else:
        n_mixed, lengths = 32, [64, 128, 256, 512]
    modes = ["dual", "prefix", "none", "dual"]
    mixed = []
    for i in range(n_mixed):
        g = lengths[i % len(lengths)]
        mixed.append((prompt(rnd.randrange(P // 2, 2 * P)),
                      SamplingParams(gen_length=g, block_length=min(B, g), cache=modes[i % len(modes)])))
    arrivals = sorted(rnd.randrange(0, 4 * G) for _ in range(n_mixed))
    record(f"4. {n_mixed} mixed lengths/modes, joining",
           run_batch(bundle, mixed, arrivals, n_mixed, cuda_graphs=graphs), base)
    long_g = 1024 if not q else 128
    record(f"5. batch 1, gen {long_g}, dual cache",
           run_batch(bundle, [(prompt(), one(gen=long_g, cache="dual"))], cuda_graphs=graphs), base)
    record("6. batch 1, threshold 0.9, dual cache",
           run_batch(bundle, [(prompt(), one(threshold=0.9, cache="dual"))], cuda_graphs=graphs), base)
    # Exact parallel decoding (draft_depth 4): the same ids as 1 / 2 / 3, fewer forwards where the
    # guesses hold (random weights guess worse than a trained model: see docs/default_model_eval.md).
    # Rows 7 and 8 have room for every draft; row 9 runs under the server's default budget (2048
    # query tokens per step), which a full batch already uses: it drafts little or nothing. Each
    # runs a fresh batch as the server builds it: its draft gate (on by default on a CPU) starts
    # drafting and keeps it only where the timed steps say it pays. Rows 10 and 11 repeat 7 and 8
    # with a gate that already served the same request once (a server's batch after its first
    # requests), on a fresh batch otherwise.
    if getattr(bundle.model, "tp", None) is not None:
        return  # requests run at draft depth 0 under tensor parallelism: drafting rows would repeat 1-3
    d4 = lambda **kw: one(draft_depth=4, **kw)
    room = 5 * (P + G) * 2
    exact, dual = [(base_req[0][0], d4())], [(base_req[0][0], d4(cache="dual"))]
    record("7. batch 1, exact, draft depth 4", run_batch(bundle, exact, draft_budget=room), base)
    record("8. batch 1, dual cache, draft depth 4",
           run_batch(bundle, dual, cuda_graphs=graphs, draft_budget=room), base)
    record(f"9. {n_many} requests, dual cache, draft depth 4, budget 2048",
           run_batch(bundle, [(p, replace(sp, draft_depth=4)) for p, sp in many], max_requests=n_many,
                     cuda_graphs=graphs, draft_budget=2048), base)
    for label_, reqs in (("10. as 7", exact), ("11. as 8", dual)):
        gate = gate_for(None, dev, room)
        if gate is None:  # off by default here (CUDA): the rows would repeat 7 and 8
            break
        runs = [run_batch(bundle, reqs, cuda_graphs=graphs, draft_budget=room, gate=gate)
                for _ in range(SEQUENTIAL)]
        record(f"{label_}, {SEQUENTIAL} requests one after another (one gate, its probes included)",
               merge_runs(runs), base)


SEQUENTIAL = 16  # requests run one after another through one gate in rows 10 and 11


def merge_runs(runs: list[Result]) -> Result:
    """One row of runs made one after another: their tokens, times and forwards summed."""
    gate = [tuple(int(x) for x in r.gate.split("/")) for r in runs if r.gate != "off"]
    out = Result("", sum(r.tokens for r in runs), sum(r.seconds for r in runs), sum(r.forwards for r in runs),
                 sum(r.tokens_in_forwards for r in runs), max(r.peak_bytes for r in runs), runs[0].requests,
                 sum(r.host_seconds for r in runs), sum(r.draft_rows for r in runs))
    if gate:
        out.gate = f"{sum(a for a, _ in gate)}/{sum(b for _, b in gate)}"
    return out

if __name__ == "__main__":
    sys.exit(main())
