"""The model runner of a tensor-parallel engine: rank 0 leads, the other ranks follow.

Rank 0 owns the engine (`sampler.scheduler.Engine`: admission, scheduling, events) and its batch;
every other rank holds an identical batch over its shard of the model. Whatever changes a batch
reaches the followers as a broadcast of one small int64 header (the operation and its integer
arguments), plus, for admissions and scoring forwards only, the request's data (token ids and
parameters as JSON bytes in a uint8 tensor):

    STEP / STEP_ASYNC   every rank runs the same step (the collectives of the forward and of the
                        selection pair up); a step is the header alone
    ADD rid             the request's prompt, suffix, span and SamplingParams
    REMOVE rid, DISCARD the same bookkeeping on every rank
    SCORE               the canvases of one packed scoring forward
    STOP                followers return

Each rank plans the step itself from the same state (the host plan is a pure function of it, and
the selection returns identical candidates on every rank), so the per-step traffic is the header.
Operations without collectives (add, remove, discard) run on rank 0 first and are sent only when
they succeeded; steps and scoring forwards are sent first, then run.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch
import torch.distributed as dist

from sampler.engine_config import EngineConfig
from sampler.likelihood import ScoreBatch, _Canvas, _Pair
from sampler.params import SamplingParams

log = logging.getLogger("llada.runner")

STOP, STEP, STEP_ASYNC, ADD, REMOVE, DISCARD, SCORE = range(7)


class Channel:
    """Broadcasts from rank 0 to every rank of `tp`'s group (on the CPU for gloo, else the model's
    device)."""

    def __init__(self, tp, device):
        self.tp = tp
        self.device = device
        self.on_error = None  # called with the reason when a send fails (a rank is gone)

    def send(self, op: int, arg: int = 0, payload: dict | None = None) -> None:
        try:
            self._send(op, arg, payload)
        except Exception as e:
            if self.on_error is not None:
                self.on_error(f"{type(e).__name__}: {e}")
            raise

    def _send(self, op: int, arg: int = 0, payload: dict | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        head = torch.tensor([op, arg, len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(head, 0, group=self.tp.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), 0,
                           group=self.tp.group)

    def receive(self) -> tuple[int, int, dict | None]:
        head = torch.empty(3, dtype=torch.int64, device=self.device)
        dist.broadcast(head, 0, group=self.tp.group)
        op, arg, n = head.tolist()
        if not n:
            return op, arg, None
        buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, 0, group=self.tp.group)
        return op, arg, json.loads(bytes(buf.cpu().tolist()))


def _params_dict(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)


def _canvases_payload(canvases) -> dict:
    return {"c": [{"ids": c.ids, "rows": c.rows, "masked": list(c.masked), "greedy": c.greedy,
                   "cfg": c.pair.cfg_scale, "ctx": c.pair.context, "cont": c.pair.continuation}
                  for c in canvases]}


def _canvases_from(payload: dict):
    out = []
    for c in payload["c"]:
        pair = _Pair(None, 0, c["ctx"], c["cont"], float(c["cfg"]), [tuple(c["masked"])])
        out.append(_Canvas(pair, tuple(c["masked"]), bool(c["greedy"]), c["ids"], c["rows"]))
    return out


class LeaderBatch:
    """Rank 0's batch: the `Batch` interface, each change sent to the followers."""

    def __init__(self, batch, channel: Channel):
        self._batch = batch
        self._ch = channel

    def __getattr__(self, name):  # read-only parts of the interface
        return getattr(self._batch, name)

    def __len__(self) -> int:
        return len(self._batch)

    def add(self, rid, prompt_ids, params, suffix_ids=(), span_ids=None) -> None:
        self._batch.add(rid, prompt_ids, params, suffix_ids=suffix_ids, span_ids=span_ids)
        self._send_quietly(ADD, rid, {"prompt": list(prompt_ids), "params": _params_dict(params),
                                 "suffix": list(suffix_ids or ()),
                                 "span": None if span_ids is None else list(span_ids)})

    def remove(self, rid) -> None:
        self._batch.remove(rid)
        self._send_quietly(REMOVE, rid)

    def discard(self) -> None:
        self._batch.discard()
        self._send_quietly(DISCARD)

    def _send_quietly(self, op, arg=0, payload=None) -> None:
        """Bookkeeping sends: a failure is the channel's `on_error` (the engine stops serving)."""
        try:
            self._ch.send(op, arg, payload)
        except Exception:  # noqa: BLE001 - reported through on_error
            log.debug("runner operation %d not sent", op)

    def step(self):
        self._ch.send(STEP)
        return self._batch.step()

    def step_async(self):
        self._ch.send(STEP_ASYNC)
        return self._batch.step_async()


class LeaderScorer:
    """Rank 0's scoring batch: each packed forward's canvases sent to the followers first."""

    def __init__(self, scorer: ScoreBatch, channel: Channel):
        self._scorer = scorer
        self._ch = channel

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def __len__(self) -> int:
        return len(self._scorer)

    def run(self, canvases):
        self._ch.send(SCORE, 0, _canvases_payload(canvases))
        return self._scorer.run(canvases)


def lead(batch, scorer, tp):
    """(batch, scorer) for rank 0's engine: the same objects, mirrored on every rank."""
    ch = Channel(tp, batch.device if _device_channel(tp) else torch.device("cpu"))
    return LeaderBatch(batch, ch), LeaderScorer(scorer, ch), ch


def _device_channel(tp) -> bool:
    return dist.get_backend(tp.group) == "nccl"


def follow(batch, scorer, tp, report=None) -> None:
    """A follower's loop: apply rank 0's operations to this rank's batch until STOP. A step that
    fails here fails on rank 0 too (same state, same inputs); its DISCARD follows. `report()` is
    called after operations, at most once a second (the rank's memory for rank 0's /metrics)."""
    import time

    ch = Channel(tp, batch.device if _device_channel(tp) else torch.device("cpu"))
    last = 0.0
    while True:
        if report is not None and time.monotonic() - last >= 1.0:
            report()
            last = time.monotonic()
        op, arg, payload = ch.receive()
        if op == STOP:
            return
        try:
            if op == STEP:
                batch.step()
            elif op == STEP_ASYNC:
                batch.step_async()
            elif op == ADD:
                batch.add(arg, payload["prompt"], SamplingParams(**payload["params"]),
                          suffix_ids=payload["suffix"], span_ids=payload["span"])
            elif op == REMOVE:
                batch.remove(arg)
            elif op == DISCARD:
                batch.discard()
            elif op == SCORE:
                scorer.run(_canvases_from(payload))
            else:
                raise RuntimeError(f"unknown runner operation {op}")
        except Exception:  # noqa: BLE001 - rank 0 sees the same failure and decides
            log.exception("rank %d: operation %d failed", tp.rank, op)


def serve_follower(model, special, config) -> None:
    """A follower rank of an engine with `config` (`sampler.scheduler.EngineConfig`): the same
    batch and scorer as rank 0's, driven by rank 0 until it stops."""
    from sampler.strategies import make_batch

    batch = make_batch(model, special, capacity_tokens=config.max_batch_tokens,
                       max_requests=config.max_batch_size, cuda_graphs=config.cuda_graphs)
    if batch.graphs is not None:
        batch.graphs.warm(batch.hot_buckets())
    follow(batch, ScoreBatch(model, special.mask), model.tp, _reporter(model))


def _reporter(model):
    """Writes this rank's memory to LLADA_RANK_STATS_DIR/rank{r} (read by `rank_memory`), or None."""
    import os

    where = os.environ.get("LLADA_RANK_STATS_DIR")
    if not where:
        return None
    path = os.path.join(where, f"rank{model.tp.rank}")

    def report():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(rank_memory_bytes(model.device)))
        os.replace(tmp, path)

    return report


def rank_memory(stats_dir: str | None, size: int, device) -> dict[int, int]:
    """rank -> memory bytes: rank 0 measured now, the followers as last reported (absent until
    their first report)."""
    import os

    out = {0: rank_memory_bytes(device)}
    for r in range(1, size):
        try:
            with open(os.path.join(stats_dir or "", f"rank{r}")) as f:
                out[r] = int(f.read())
        except (OSError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- rank processes of a server
def rank_memory_bytes(device) -> int:
    """This process's memory: GPU memory allocated on CUDA, else its resident set size."""
    if getattr(device, "type", None) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def init_ranks(size: int, backend: str | None = None):
    """The process group of this process (`weights.parallel.TensorParallel`), from the environment a
    launcher or `spawn_followers` set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. The group's
    timeout is long: followers wait on rank 0's next operation however long the server is idle."""
    import datetime
    import os

    from weights.parallel import TensorParallel

    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise RuntimeError(f"--tensor-parallel-size {size} but the launcher started {world} ranks")
    rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(days=30))
    return TensorParallel(rank, world)


def spawn_followers(size: int, argv: list[str]) -> list:
    """Start ranks 1 .. size-1 of a server on this node (`python -m sampler.runner ARGV`, one process
    each), set this process up as rank 0 and return the follower processes."""
    import os
    import subprocess
    import sys

    from weights.parallel import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(size))
    procs = []
    for r in range(1, size):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), LLADA_PARENT_PID=str(os.getpid()))
        procs.append(subprocess.Popen([sys.executable, "-m", "sampler.runner", *argv], env=e))
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    return procs


def _exit_with_parent() -> None:
    """A follower started by `spawn_followers` ends when its rank 0 is gone (no orphan waits)."""
    import os
    import threading
    import time

    parent = int(os.environ.get("LLADA_PARENT_PID", "0"))
    if not parent:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="llada-parent-watch").start()


def follower_main(model_dir: str, device: str, dtype: str, size: int, config) -> int:
    """A follower rank of `llada-serve`: load this rank's shard, follow rank 0 until it stops."""
    from weights.checkpoint import load_checkpoint, pick_cpu_threads

    import os
    import signal

    if os.environ.get("LLADA_PARENT_PID"):
        # SIGTERM / SIGINT sent to the whole process group: rank 0 drains, then stops this rank.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    tp = init_ranks(size)
    try:
        bundle = load_checkpoint(model_dir, device=device, dtype=dtype, tp=tp)
        pick_cpu_threads(bundle.config, bundle.device)
        log.info("rank %d/%d: loaded its shard (%.1f MiB)", tp.rank, size,
                 sum(p.numel() * p.element_size() for p in bundle.model.parameters()) / 2**20)
        serve_follower(bundle.model, bundle.special, config)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m sampler.runner", description="a follower rank")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, required=True)
    ap.add_argument("--max-batch-tokens", type=int, required=True)
    ap.add_argument("--cuda-graphs", type=int, default=1)
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = EngineConfig(max_batch_size=a.max_batch_size, max_batch_tokens=a.max_batch_tokens,
                       cuda_graphs=bool(a.cuda_graphs))
    try:
        return follower_main(a.model, a.device, a.dtype, a.tensor_parallel_size, cfg)
    except Exception as e:  # noqa: BLE001 - one line, non-zero: rank 0 notices and stops
        print(f"llada-serve rank: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    import sys

    sys.exit(main())


class Ranks:
    """Rank 0's view of a tensor-parallel server: its process group, the follower processes it
    started (none under a launcher), their memory reports, and what happens when one is lost."""

    def __init__(self, tp, procs, stats_dir):
        self.tp = tp
        self.procs = procs
        self.stats_dir = stats_dir
        self.engine = None
        self._stopping = False

    @classmethod
    def start(cls, size: int, model_dir: str, args, spawn: bool) -> "Ranks":
        import os
        import tempfile

        stats_dir = None
        procs = []
        if spawn:
            stats_dir = tempfile.mkdtemp(prefix="llada-ranks-")
            os.environ["LLADA_RANK_STATS_DIR"] = stats_dir
            argv = ["--model", model_dir, "--device", args.device, "--dtype", args.dtype,
                    "--tensor-parallel-size", str(size), "--max-batch-size", str(args.max_batch_size),
                    "--max-batch-tokens", str(args.max_batch_tokens),
                    "--cuda-graphs", str(int(bool(args.cuda_graphs))), "--log-level", args.log_level]
            procs = spawn_followers(size, argv)
        ranks = cls(None, procs, stats_dir)
        if procs:  # a follower that fails before the rendezvous completes ends the start-up
            import threading

            threading.Thread(target=ranks._watch, daemon=True, name="llada-rank-watch").start()
        try:
            ranks.tp = init_ranks(size)
        except Exception:
            for p in procs:
                p.kill()
            raise
        return ranks

    def attach(self, engine, metrics) -> None:
        """Wire the engine and metrics: TP size and rank memory on /metrics, a lost rank fails the
        requests with 503 and exits non-zero (a follower process that ends is noticed within 0.2 s)."""
        self.engine = engine
        metrics.tensor_parallel_size.set(self.tp.size)
        metrics.ranks = lambda: rank_memory(self.stats_dir, self.tp.size, engine.model.device)
        engine.on_fatal = self._fatal
        if engine.channel is not None:
            engine.channel.on_error = engine.rank_lost

    def _watch(self) -> None:
        """Polls the followers: one that ends while the server starts stops the start-up (exit 1);
        one that ends while it serves is `Engine.rank_lost`."""
        import os
        import time

        while not self._stopping:
            for r, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is None or self._stopping:
                    continue
                if self.engine is None:
                    log.error("rank %d exited with status %s during start-up; stopping", r, code)
                    self._fatal(f"rank {r} exited during start-up")
                    return
                if self.engine.channel is not None:
                    self.engine.rank_lost(f"rank {r} exited with status {code}")
                    return
            time.sleep(0.2)

    def _fatal(self, reason: str) -> None:
        """Stop the other ranks and exit non-zero once the 503 answers have gone out."""
        import os
        import threading

        log.error("stopping every rank and exiting: %s", reason)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        self._cleanup()
        threading.Timer(1.0, lambda: os._exit(1)).start()

    def stop(self, timeout: float = 10.0) -> None:
        """After the engine has sent STOP: wait for the followers (kill any left), clean up."""
        import time

        self._stopping = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a follower that does not stop is killed
                p.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        import shutil

        if self.stats_dir:
            shutil.rmtree(self.stats_dir, ignore_errors=True)
