"""Held-out exact-match accuracy of the default model through the project's sampler.

For each decoding setting (s/t schedule at several step counts, confidence-threshold decoding at
several thresholds; no cache) every held-out prompt of every evaluated task in
`training/tasks.py` is rendered with the checkpoint's chat template, denoised by
`sampler.generate.generate`, cut at the first EOS/EoT, decoded and compared with the expected
answer. Writes a markdown table (`docs/default_model_eval.md`) and a plot of accuracy against
forwards per generated token (`docs/default_model_accuracy.png`).

    python training/evaluate.py [--model weights/default] [--per-task 50]
    python training/evaluate.py --drafting-only   # only the exact parallel decoding section

Exact parallel decoding (`draft_depth`): at one token per step, greedy and sampled, forwards per
token with drafting against the same run without, answers compared id for id; the section
"Exact parallel decoding" of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler.generate import cut_answer, generate  # noqa: E402
from sampler.params import SamplingParams  # noqa: E402
from tasks import TaskSet  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402


@dataclass
class Setting:
    label: str
    params: SamplingParams


def settings(gen_length: int) -> list[Setting]:
    out = []
    for div in (1, 2, 4, 8, 16):
        steps = gen_length // div
        if steps < 1:
            continue
        out.append(Setting(f"steps {steps}", SamplingParams(gen_length=gen_length, steps=steps)))
    for th in (0.9, 0.7, 0.5, 0.3):
        out.append(Setting(f"threshold {th}", SamplingParams(gen_length=gen_length, threshold=th)))
    return out


def prompts_for(bundle, examples):
    tok = bundle.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                    add_generation_prompt=True) for ex in examples]


def answers(bundle, gens) -> list[str]:
    tok = bundle.tokenizer
    return [tok.decode(cut_answer(g.gen_ids, bundle.special.stop)).strip() for g in gens]


def run_setting(bundle, heldout, setting: Setting, chunk: int = 128):
    names, exs = [], []
    for name, xs in heldout.items():
        names += [name] * len(xs)
        exs += xs
    prompts = prompts_for(bundle, exs)
    outs, nfes = [], []
    for i in range(0, len(prompts), chunk):
        gens = generate(bundle, prompts[i:i + chunk], setting.params)
        outs += answers(bundle, gens)
        nfes += [g.nfe for g in gens]
    per_task: dict[str, list[int]] = {}
    for name, ex, out in zip(names, exs, outs):
        per_task.setdefault(name, []).append(int(out == ex.answer))
    acc = {k: sum(v) / len(v) for k, v in per_task.items()}
    all_hits = [h for v in per_task.values() for h in v]
    mean_nfe = sum(nfes) / len(nfes)
    # answer tokens: the expected answer's tokens plus its <|eot_id|>
    ans_tokens = [len(bundle.tokenizer.encode(ex.answer)) + 1 for ex in exs]
    return {
        "label": setting.label,
        "per_task": acc,
        "overall": sum(all_hits) / len(all_hits),
        "task_mean": sum(acc.values()) / len(acc),
        "mean_nfe": mean_nfe,
        "forwards_per_token": mean_nfe / setting.params.gen_length,
        "forwards_per_answer_token": sum(n / a for n, a in zip(nfes, ans_tokens)) / len(nfes),
        "samples": [(n, e.prompt, e.answer, o) for n, e, o in zip(names, exs, outs)],
    }


DRAFT_DEPTHS = (4, 8)
DRAFT_RUNS = (("greedy", dict()), ("temperature 1", dict(temperature=1.0, seed=1234)),
              ("temperature 3", dict(temperature=3.0, seed=1234)))


def run_drafting(bundle, heldout, gen_length: int, chunk: int = 128) -> list[dict]:
    """Per task and run (greedy; sampled with a fixed seed), at one token per step (one
    block, cache none): mean forwards per generated token without drafting and at each depth of
    DRAFT_DEPTHS, and how many prompts' generated ids are identical to the run without."""
    out = []
    greedy: dict[str, list] = {}
    for run, extra in DRAFT_RUNS:
        for name, exs in heldout.items():
            prompts = prompts_for(bundle, exs)
            row = {"run": run, "task": name, "n": len(exs)}
            base_ids = None
            for depth in (0,) + DRAFT_DEPTHS:
                sp = SamplingParams(gen_length=gen_length, steps=gen_length, draft_depth=depth, **extra)
                gens = []
                for i in range(0, len(prompts), chunk):
                    gens += generate(bundle, prompts[i:i + chunk], sp)
                fwd = sum(g.forwards for g in gens) / len(gens) / gen_length
                row[f"fpt_{depth}"] = fwd
                row[f"nfe_{depth}"] = sum(g.nfe for g in gens) / len(gens) / gen_length
                if depth == 0:
                    base_ids = [g.gen_ids for g in gens]
                    greedy.setdefault(name, base_ids)
                    row["sampled"] = sum(b != g for b, g in zip(base_ids, greedy[name]))
                else:
                    row[f"same_{depth}"] = sum(g.gen_ids == b for g, b in zip(gens, base_ids))
            out.append(row)
    return out


def drafting_markdown(rows, args) -> str:
    depths = DRAFT_DEPTHS
    head = ("| run | task | prompts | ids differ from greedy | forwards / token, off | "
            + " | ".join(f"depth {d}: forwards / token | ratio | identical answers" for d in depths) + " |")
    sep = "|---" * (5 + 3 * len(depths)) + "|"
    lines = []
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == run]
        total = dict(run=run, task="**all**", n=sum(r["n"] for r in rs), sampled=sum(r["sampled"] for r in rs))
        for d in (0,) + depths:
            total[f"fpt_{d}"] = sum(r[f"fpt_{d}"] * r["n"] for r in rs) / total["n"]
            if d:
                total[f"same_{d}"] = sum(r[f"same_{d}"] for r in rs)
        for r in rs + [total]:
            cells = " | ".join(f"{r[f'fpt_{d}']:.3f} | {r[f'fpt_{d}'] / r['fpt_0']:.3f} | {r[f'same_{d}']}/{r['n']}"
                               for d in depths)
            lines.append(f"| {r['run']} | {r['task']} | {r['n']} | {r['sampled']} | {r['fpt_0']:.3f} | {cells} |")
    return f"""## Exact parallel decoding

Produced by `python training/evaluate.py --drafting-only --per-task {args.per_task} --gen-length {args.gen_length}`.
One block of {args.gen_length} tokens, {args.gen_length} steps (one token per step), cache none, the
held-out prompts above. "greedy" is temperature 0; "temperature T" samples with seed 1234
(counter-based noise: the same draw for the same seed, step and position, drafting or not); "ids
differ from greedy" counts the prompts whose sampled span is not the greedy one (this small model
is sharp). `draft_depth` d: each forward also runs up to d draft rows (guessed next states) and
advances as many steps as the sampler itself confirms. "forwards / token" = forwards actually run
per generated position (the reference's NFE stays {args.gen_length}: one per step); "ratio" =
forwards with drafting / forwards without; "identical answers" = prompts whose generated ids equal
the run without drafting, id for id.

{head}
{sep}
{chr(10).join(lines)}
"""


def splice_drafting(table: Path, section: str) -> None:
    """Replace (or append) the drafting section of an existing table file."""
    text = table.read_text() if table.exists() else ""
    mark = "## Exact parallel decoding"
    if mark in text:
        text = text[:text.index(mark)].rstrip() + "\n"
    table.write_text(text + ("\n" if text else "") + section)


def run_infill(bundle, examples) -> list[dict]:
    """The infill form on held-out `alphabet` runs: the prompt asks for the run ("Letters from c to
    h"), the answer canvas holds the run and its <|eot_id|> with inner letters masked, and the model
    fills the masks (`sampler.generate.generate` with spans: one block over the span, one step per
    masked position). Exact match of the whole run, for two masking patterns."""
    tok, mask = bundle.tokenizer, bundle.special.mask
    out = []
    for label, hide in (("every other inner letter masked", lambda i, n: 0 < i < n - 1 and i % 2 == 1),
                        ("all inner letters masked", lambda i, n: 0 < i < n - 1)):
        prompts, spans, params = [], [], []
        for ex in examples:
            run = ex.answer.split()
            prompts.append(tok.apply_chat_template(
                [{"role": "user", "content": f"Letters from {run[0]} to {run[-1]}"}], add_generation_prompt=True))
            ids = tok.encode(ex.answer)  # one token per letter (checked below)
            assert len(ids) == len(run)
            span = [mask if hide(i, len(ids)) else t for i, t in enumerate(ids)] + [bundle.special.eot]
            spans.append(span)
            params.append(SamplingParams(gen_length=len(span), steps=span.count(mask)))
        gens = generate(bundle, prompts, params, spans=spans)
        hits = [int(tok.decode(g.gen_ids[:-1]) == ex.answer) for g, ex in zip(gens, examples)]
        out.append({"label": label, "accuracy": sum(hits) / len(hits), "n": len(hits),
                    "masked": sum(s.count(mask) for s in spans) / len(spans)})
    return out


def markdown(results, heldout, args, seconds, infill=None) -> str:
    tasks = list(heldout)
    head = "| setting | " + " | ".join(tasks) + " | all prompts | mean NFE | forwards / token | forwards / answer token |"
    sep = "|---" * (len(tasks) + 5) + "|"
    rows = []
    for r in results:
        cells = " | ".join(f"{r['per_task'][t]:.0%}" for t in tasks)
        rows.append(f"| {r['label']} | {cells} | **{r['overall']:.1%}** | {r['mean_nfe']:.2f} | "
                    f"{r['forwards_per_token']:.3f} | {r['forwards_per_answer_token']:.2f} |")
    counts = ", ".join(f"{t} {len(v)}" for t, v in heldout.items())
    misses = [s for s in results[0]["samples"] if s[2] != s[3]][:12]
    miss_rows = "\n".join(f"| {n} | `{p}` | `{a}` | `{o}` |" for n, p, a, o in misses) or "| | | | |"
    return f"""# Default model: held-out evaluation

Produced by `python training/evaluate.py --per-task {args.per_task} --gen-length {args.gen_length}`
on `{args.model}` ({seconds:.0f} s on the CPU). Held-out prompts come from `training/tasks.py`:
their content keys are never drawn for training. Every prompt goes through the checkpoint's chat
template and `sampler.generate.generate` (temperature 0, low-confidence remasking, one block of
{args.gen_length} tokens, cache none); the answer is the generated span cut at the first EOS or
`<|eot_id|>`, compared exactly with the expected answer.

Held-out prompts per task: {counts}.

"steps N": the s/t schedule with N steps for the {args.gen_length} masked tokens (steps
{args.gen_length} = one token per forward). "threshold T": Fast-dLLM confidence-threshold
decoding (each forward unmasks the most confident position and every other one with confidence
>= T). "forwards / token" = model forwards per generated position (mean NFE / gen_length);
"forwards / answer token" = forwards per token of the expected answer and its `<|eot_id|>` (the
rest of the span is EOS padding), averaged over prompts.

{head}
{sep}
{chr(10).join(rows)}

"all prompts" is exact match over every held-out prompt. Target: at least 90% with steps equal
to the answer span ({args.gen_length}).

![accuracy against forwards per token](default_model_accuracy.png)

Infilling (the server's `infill` form) on the held-out `alphabet` runs: the prompt asks for the run
("Letters from c to h"), the answer canvas holds the run and its `<|eot_id|>` with inner letters
masked, and the model fills the masks (one block over the span, one step per masked position); exact
match of the whole run.

| masking | held-out runs | masked letters per run | exact match |
|---|---|---|---|
{chr(10).join(f"| {r['label']} | {r['n']} | {r['masked']:.1f} | **{r['accuracy']:.0%}** |" for r in infill or [])}

Misses at steps {args.gen_length} (first {len(misses)}):

| task | prompt | expected | got |
|---|---|---|---|
{miss_rows}
"""


def plot(results, heldout, path: Path, gen_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    tasks = list(heldout)
    for kind, marker in (("steps", "o"), ("threshold", "s")):
        rs = sorted((r for r in results if r["label"].startswith(kind)),
                    key=lambda r: r["forwards_per_token"])
        if not rs:
            continue
        xs = [r["forwards_per_token"] for r in rs]
        ys = [100 * r["overall"] for r in rs]
        ax.plot(xs, ys, marker=marker, label="s/t schedule: steps" if kind == "steps"
                else "threshold decoding: threshold")
        for i, (r, x, y) in enumerate(zip(rs, xs, ys)):
            dy = -14 if kind == "steps" else 8 + 10 * (i % 2)
            ax.annotate(r["label"].split()[1], (x, y), textcoords="offset points", xytext=(-4, dy),
                        fontsize=8)
        # the worst task at each point, to show where the loss comes from
        ax.scatter(xs, [100 * min(r["per_task"][t] for t in tasks) for r in rs], marker=marker,
                   facecolors="none", edgecolors="grey", s=18)
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"model forwards per generated token (gen_length {gen_length}, log scale)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("default model: accuracy against forwards\n(filled: all prompts, hollow grey: worst task)",
                 fontsize=10)
    low = min(100 * min(r["per_task"].values()) for r in results)
    ax.set_ylim(max(0, low - 8), 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="held-out accuracy of the default model")
    ap.add_argument("--model", type=Path, default=ROOT / "weights" / "default")
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--gen-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", type=Path, default=ROOT / "docs" / "default_model_eval.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "default_model_accuracy.png")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--drafting-only", action="store_true",
                    help="only measure exact parallel decoding and rewrite that section of --table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bundle = load_checkpoint(args.model, device="cpu", dtype="float32")
    heldout = TaskSet().heldout(args.per_task)
    if args.drafting_only:
        rows = run_drafting(bundle, heldout, args.gen_length)
        section = drafting_markdown(rows, args)
        print(section)
        splice_drafting(args.table, section)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote the drafting section of {args.table} ({time.time() - t0:.0f} s)")
        return
    results = []
    for s in settings(args.gen_length):
        r = run_setting(bundle, heldout, s)
        results.append(r)
        print(f"{r['label']:>14}: all {r['overall']:.1%}  NFE {r['mean_nfe']:.2f}  "
              + "  ".join(f"{k} {v:.0%}" for k, v in r["per_task"].items()), flush=True)
    infill = run_infill(bundle, heldout["alphabet"])
    for r in infill:
        print(f"infill, {r['label']}: {r['accuracy']:.0%} of {r['n']}", flush=True)
    drafting = drafting_markdown(run_drafting(bundle, heldout, args.gen_length), args)
    seconds = time.time() - t0
    try:
        args.model = args.model.resolve().relative_to(ROOT)
    except ValueError:
        pass
    args.table.write_text(markdown(results, heldout, args, seconds, infill) + "\n" + drafting)
    plot(results, heldout, args.plot, args.gen_length)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "samples"}
                                         for r in results], indent=1))
    print(f"wrote {args.table} and {args.plot} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
