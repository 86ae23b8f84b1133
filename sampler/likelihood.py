"""Monte Carlo likelihood of a continuation given a context (the LLaDA paper's estimator), batched.

For a pair (context c, continuation y of n tokens) one Monte Carlo sample draws l uniformly in
1..n, masks l of y's positions chosen uniformly at random, runs the mask predictor on c ++ y_masked
and takes the cross-entropy summed over the masked positions; the sample's value is
-(n / l) * that sum. The estimate of log p(y | c) is the mean over `mc_samples` samples, reported
with its standard error. `is_greedy` asks whether one forward over c ++ [MASK] * n predicts every
token of y as its argmax. With `cfg_scale` > 0 every canvas is also run with the context masked
and the logits are combined as in sampling: u + (cfg_scale + 1) * (c - u).

The samples of a pair are a pure function of (seed, context ids, continuation ids): the same pair
with the same seed gets the same estimate whatever it is batched with. Identical canvases inside
one pair (always the case for one-token continuations, and for every sample that masks all of y)
are evaluated once and counted with their multiplicity; `forwards` counts the canvases actually
evaluated (twice with CFG).

`ScoreBatch` holds the canvases of every scoring request waiting in the engine and evaluates as
many as fit a token budget in one packed forward of the network (no padding, no key/value cache,
the LM head on the scored rows only), so concurrent scoring requests share forwards.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
import statistics
from dataclasses import dataclass, field

import torch

from weights.layers import AttnLayout

MAX_MC_SAMPLES = 1024


@dataclass(frozen=True)
class PairScore:
    logprob: float            # the Monte Carlo estimate of log p(continuation | context)
    stderr: float | None      # standard error of the estimate (None with one sample)
    forwards: int             # canvases evaluated for this pair (CFG counts two per canvas)
    is_greedy: bool
    tokens: int               # continuation length


def sample_masks(seed: int, context: list[int], continuation: list[int], mc_samples: int) -> list[tuple[int, ...]]:
    """The masked positions (indices into the continuation, sorted) of each Monte Carlo sample."""
    n = len(continuation)
    h = hashlib.sha256(repr((int(seed), list(context), list(continuation))).encode()).digest()
    r = random.Random(int.from_bytes(h[:16], "big"))
    out = []
    for _ in range(mc_samples):
        size = r.randint(1, n)
        out.append(tuple(sorted(r.sample(range(n), size))))
    return out


def summarize(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) of the per-sample values."""
    m = len(values)
    mean = statistics.fmean(values)
    if m < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(m)


@dataclass(eq=False)
class _Canvas:
    pair: "_Pair"
    masked: tuple[int, ...]   # continuation indices masked (all of them for the greedy canvas)
    greedy: bool              # the is_greedy canvas (its rows are every continuation position)
    ids: list[int]
    rows: list[int]           # canvas positions whose logits are scored

    @property
    def tokens(self) -> int:
        return len(self.ids) * (2 if self.pair.cfg_scale > 0 else 1)


@dataclass(eq=False)
class _Pair:
    job: "ScoreJob"
    index: int
    context: list[int]
    continuation: list[int]
    cfg_scale: float
    samples: list[tuple[int, ...]]
    ce: dict = field(default_factory=dict)     # masked set -> summed cross-entropy
    greedy: bool | None = None
    forwards: int = 0
    left: int = 0

    def result(self) -> PairScore:
        n = len(self.continuation)
        values = [-(n / len(m)) * self.ce[m] for m in self.samples]
        mean, se = summarize(values)
        return PairScore(mean, se, self.forwards, bool(self.greedy), n)


@dataclass(eq=False)
class ScoreJob:
    """One scoring request: its pairs, and where its result goes (`sink(("done", [PairScore]))`)."""

    pairs: list[tuple[list[int], list[int]]]
    mc_samples: int
    seed: int
    cfg_scale: float
    sink: object
    rid: int = 0
    submitted: float = 0.0
    deadline: float | None = None
    cancelled: bool = False
    done: bool = False
    state: list = field(default_factory=list)
    left: int = 0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def canvas_tokens(self) -> int:
        return max((len(c) + len(y)) * (2 if self.cfg_scale > 0 else 1) for c, y in self.pairs)


class ScoreBatch:
    """Canvases of the scoring requests in flight, evaluated in packed forwards."""

    def __init__(self, model, mask_id: int):
        self.model = model
        self.mask_id = mask_id
        self.queue: collections.deque[_Canvas] = collections.deque()
        self.forwards = 0  # packed model forwards run

    def add(self, job: ScoreJob) -> None:
        job.state = []
        for i, (ctx, cont) in enumerate(job.pairs):
            samples = sample_masks(job.seed, ctx, cont, job.mc_samples)
            pair = _Pair(job, i, list(ctx), list(cont), float(job.cfg_scale), samples)
            everything = tuple(range(len(cont)))
            for m in sorted(set(samples) | {everything}):
                hidden = set(m)
                ids = list(ctx) + [self.mask_id if j in hidden else t for j, t in enumerate(cont)]
                self.queue.append(_Canvas(pair, m, m == everything, ids, [len(ctx) + j for j in m]))
                pair.left += 1
            job.state.append(pair)
        job.left = len(job.pairs)

    def drop(self, job: ScoreJob) -> None:
        self.queue = collections.deque(c for c in self.queue if c.pair.job is not job)

    def __len__(self) -> int:
        return len(self.queue)

    def take(self, budget: int) -> list[_Canvas]:
        """First-come canvases up to `budget` tokens (always at least one)."""
        out, used = [], 0
        while self.queue and (not out or used + self.queue[0].tokens <= budget):
            c = self.queue.popleft()
            used += c.tokens
            out.append(c)
        return out

    @torch.no_grad()
    def run(self, canvases: list[_Canvas]) -> list[ScoreJob]:
        """One packed forward over `canvases`; returns the jobs it completed."""
        dev = self.model.device
        seqs, scored, targets = [], [], []
        for c in canvases:
            seqs.append(c.ids)
            if c.pair.cfg_scale > 0:
                p = len(c.pair.context)
                seqs.append([self.mask_id] * p + c.ids[p:])
        lens = [len(s) for s in seqs]
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        si = 0
        rows_c, rows_u = [], []
        for c in canvases:
            base = starts[si]
            rows_c.extend(base + r for r in c.rows)
            if c.pair.cfg_scale > 0:
                rows_u.extend(starts[si + 1] + r for r in c.rows)
                si += 2
            else:
                rows_u.extend([-1] * len(c.rows))
                si += 1
            p = len(c.pair.context)
            targets.extend(c.pair.continuation[r - p] for r in c.rows)
            scored.append(len(c.rows))
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        layout = AttnLayout.build(lens, starts, lens, torch.arange(len(ids)), dev)
        has_u = torch.tensor([u >= 0 for u in rows_u], dtype=torch.bool)
        u_rows = [u for u in rows_u if u >= 0]
        logits = self.model(ids, pos, layout, None, torch.tensor(rows_c + u_rows, dtype=torch.int64, device=dev))
        self.forwards += 1
        if getattr(self.model, "tp", None) is not None:  # scoring needs whole rows: gather the shards
            logits = self.model.tp.gather_vocab(logits)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logits = logits.to(acc)
        nc = len(rows_c)
        cond = logits[:nc]
        if u_rows:
            gi = has_u.nonzero().squeeze(1).to(dev)
            scale = torch.tensor([c.pair.cfg_scale + 1 for c in canvases for _ in c.rows],
                                 dtype=acc, device=dev)[gi].unsqueeze(1)
            u = logits[nc:]
            cond = cond.index_copy(0, gi, u + scale * (cond.index_select(0, gi) - u))
        tgt = torch.tensor(targets, dtype=torch.int64, device=dev)
        ce = (torch.logsumexp(cond, dim=-1) - cond.gather(1, tgt.unsqueeze(1)).squeeze(1)).tolist()
        hit = (cond.argmax(dim=-1) == tgt).tolist()
        done = []
        k = 0
        for c, n in zip(canvases, scored):
            pair = c.pair
            pair.ce[c.masked] = math.fsum(ce[k:k + n])
            if c.greedy:
                pair.greedy = all(hit[k:k + n])
            k += n
            pair.forwards += 2 if pair.cfg_scale > 0 else 1
            pair.left -= 1
            if pair.left == 0:
                pair.job.left -= 1
                if pair.job.left == 0:
                    done.append(pair.job)
        return done

    @staticmethod
    def results(job: ScoreJob) -> list[PairScore]:
        return [p.result() for p in job.state]
