"""Structured output against plain requests, in one process, through the batch the engine steps.

    python -m bench.bench_constrained                 # the embedded default model on the CPU
    python -m bench.bench_constrained --model DIR     # a checkpoint with a tokenizer.json
    python -m bench.bench_constrained --device cuda   # the engine's CUDA path: padded buckets,
                                                      # captured graphs, pipelined steps

Per configuration: requests, answer tokens (before the first stop id), model forwards per answer
token (the request's NFE over its answer length), the grammar engine's host time per step (masks,
forced tokens, checks; `LLaDABatch.grammar_seconds` over the steps that had constrained requests),
the share of answer tokens the grammar forced (committed without a forward), and wall time per step.
The mixed rows run the plain requests beside constrained ones and check that the plain requests'
ids and NFE are exactly those they get alone (batch invariance), then report their steps and time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sampler.constraint import GrammarVocab, compile_constraint
from sampler.generate import cut_answer
from sampler.params import SamplingParams
from sampler.strategies import make_batch
from weights import default_model_path
from weights.checkpoint import load_checkpoint, pick_cpu_threads

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "city": {"type": "string", "maxLength": 6}},
                    "required": ["zip", "city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"], "additionalProperties": False,
}


def run(bundle, prompt, params: list[SamplingParams]):
    """Run the requests in one batch; per request (gen_ids, nfe, finished step), and the batch."""
    rows = sum(len(prompt) + p.gen_length for p in params)
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows, max_requests=len(params))
    for i, p in enumerate(params):
        batch.add(i, prompt, p)
    pipelined = batch.device.type == "cuda"  # as the engine steps on CUDA
    out, steps, t0 = {}, 0, time.perf_counter()
    while len(batch):
        events = batch.step_async() if pipelined else batch.step()
        steps += 1
        for ev in events:
            if ev.finished:
                out[ev.request_id] = (ev.gen_ids, ev.nfe, steps)
                batch.remove(ev.request_id)
    wall = time.perf_counter() - t0
    return [out[i] for i in range(len(params))], batch, steps, wall


def row(name, bundle, prompt, params, forced_count=None):
    res, batch, steps, wall = run(bundle, prompt, params)
    stops = set(bundle.special.stop)
    answer = [len(cut_answer(g, stops)) for g, _, _ in res]
    nfe = [n for _, n, _ in res]
    n_con = sum(p.constraint is not None for p in params)
    return dict(config=name, requests=len(params), answer_tokens=sum(answer),
                nfe=sum(nfe) / len(nfe), forwards_per_token=sum(nfe) / max(sum(answer), 1),
                forwards=batch.forwards,
                admit_ms=1e3 * batch.grammar_admit_seconds / max(n_con, 1),
                grammar_ms_per_read=1e3 * batch.grammar_seconds / max(batch.grammar_reads, 1),
                ms_per_step=1e3 * wall / max(steps, 1), steps=steps), res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--requests", type=int, default=8, help="requests per kind")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    bundle = load_checkpoint(args.model, device=args.device, dtype="float32")
    torch.set_num_threads(pick_cpu_threads(bundle.config, torch.device(args.device)))
    vocab = GrammarVocab.of(bundle)
    prompt = bundle.tokenizer.chat_ids([{"role": "user", "content": "sort: d b a"}])
    n = args.requests
    t = time.perf_counter()
    cons = {"json_schema": compile_constraint("json_schema", PERSON, vocab),
            "json_object": compile_constraint("json_object", None, vocab),
            "regex": compile_constraint("regex", r"[a-z]{2,5}@[a-z]{3}\.(com|org)", vocab),
            "choice": compile_constraint("choice", ["red", "green", "blue"], vocab)}
    compile_ms = 1e3 * (time.perf_counter() - t) / len(cons)
    plain = [SamplingParams(gen_length=64, block_length=32, threshold=0.9, cache="dual",
                            temperature=float(i % 2), seed=i) for i in range(n)]
    rows = []
    base, base_res = row("plain (threshold 0.9, dual cache)", bundle, prompt, plain)
    rows.append(base)
    modes = {"one per forward (s/t, steps = length)": dict(),
             "threshold 0.9": dict(threshold=0.9, block_length=32, cache="dual"),
             "threshold 0.5": dict(threshold=0.5, block_length=32, cache="dual")}
    for kind in ("json_schema", "regex", "choice"):
        for mode, extra in modes.items():
            ps = [SamplingParams(gen_length=96 if kind == "json_schema" else 32, temperature=float(i % 2),
                                 seed=i, constraint=cons[kind], **extra) for i in range(n)]
            r, _ = row(f"{kind}, {mode}", bundle, prompt, ps)
            rows.append(r)
    mixed = plain + [SamplingParams(gen_length=96, temperature=float(i % 2), seed=i,
                                    constraint=cons["json_schema"], threshold=0.9, block_length=32,
                                    cache="dual") for i in range(n)]
    r, res = row("mixed: plain + json_schema", bundle, prompt, mixed)
    same = all(a[:2] == b[:2] for a, b in zip(base_res, res[:n]))
    r["plain_identical"] = same
    r["plain_steps"] = max(s for _, _, s in res[:n])
    rows.append(r)
    base["plain_steps"] = max(s for _, _, s in base_res)
    print(f"model {args.model}  vocabulary {vocab.vocab_size}  compile {compile_ms:.1f} ms per constraint")
    print("| configuration | requests | answer tokens | forwards per request | forwards / answer token "
          "| grammar ms per request at admission | grammar ms per request per step | ms / step | steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['config']} | {x['requests']} | {x['answer_tokens']} | {x['nfe']:.1f} "
              f"| {x['forwards_per_token']:.2f} | {x['admit_ms']:.2f} | {x['grammar_ms_per_read']:.3f} "
              f"| {x['ms_per_step']:.1f} | {x['steps']} |")
    print(f"plain requests beside constrained ones: identical ids and NFE: {same}; "
          f"steps to finish {r['plain_steps']} (alone {base['plain_steps']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, compile_ms=compile_ms), f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
