"""Over HTTP on a CPU: `llada-serve` configurations side by side on one model, at several loads.

    python -m bench.bench_http_cpu                                  # 26M shape, random weights
    python -m bench.bench_http_cpu --configs default,threads-1,threads-2 --clients 1,4,16 --rounds 3
    python -m bench.bench_http_cpu --config 'mine=--cpu-threads 2 --max-batch-size 8'

Each configuration is a `python -m server.cli` subprocess (the same code as `llada-serve`) on a free
loopback port, its flags the preset's (`--config NAME='[ENV=VALUE ...] FLAGS'` adds one). Per round every
configuration is started in turn (the order rotated each round), loaded by `bench.load` at each
client count (greedy completions of `--gen` tokens on a token-id prompt, EOS banned so every answer
is `--gen` tokens long), and stopped; the table gives the median generated tokens/s over the rounds,
the ratio to the first configuration, and the thread count each server logged at start-up, then the
count it ran at the end of its last round with the switches it made while serving (`/metrics`). The checkpoint is
the 26M shape of `bench.bench_public` (d 512, 8 layers) with random weights, written once to
`--ckpt` (a temporary directory by default), or `--model DIR`. `--busy-start` holds one core with a
busy process while each server starts, as another program on a shared machine may: the start-up
thread measurement sees it, the load afterwards does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from bench.load import run as load_run

PRESETS = {
    "default": [],
    "threads-1": ["--cpu-threads", "1"],
    "threads-2": ["--cpu-threads", "2"],
    "threads-2-passive": ["OMP_WAIT_POLICY=PASSIVE", "--cpu-threads", "2"],
    "threads-2-batch-8": ["--cpu-threads", "2", "--max-batch-size", "8"],
}


def write_checkpoint(path: Path) -> Path:
    """The 26M shape with random weights as a checkpoint directory the server loads (once)."""
    if (path / "config.json").is_file():
        return path
    from safetensors.torch import save_file

    from bench.bench_public import SHAPE_26M, build_model

    _, bundle = build_model("26m")
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(SHAPE_26M, architectures=["LLaDAModelLM"], model_type="llada", block_type="llama",
               activation_type="silu", layer_norm_type="rms", rms_norm_eps=1e-5, rope=True,
               include_bias=False, alibi=False, weight_tying=False)
    tensors = {k: t.detach().contiguous().clone() for k, t in bundle.model.checkpoint_tensors().items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m server.cli` subprocess; its log goes to a file read for the thread line."""

    def __init__(self, model: str, flags: list[str], log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in ("LLADA_CPU_THREADS", "OMP_NUM_THREADS")}
        while flags and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", flags[0]):  # leading NAME=VALUE: environment
            key, _, value = flags[0].partition("=")
            env[key] = value
            flags = flags[1:]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "server.cli", "--model", model, "--device", "cpu",
               "--port", str(self.port), "--drain-delay", "0", *flags]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log_path}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout}s; log: {self.log_path}")

    def threads(self) -> str:
        m = re.findall(r"(\d+) CPU threads?", self.log_path.read_text())
        return m[-1] if m else "?"

    def live_threads(self) -> str:
        """The count the engine runs now and its switches while serving (the /metrics gauges)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        now = re.search(r"^llada_cpu_threads\{[^}]*\} ([0-9.]+)", text, re.M)
        switches = re.search(r"^llada_cpu_thread_switches_total\{[^}]*\} ([0-9.]+)", text, re.M)
        if now is None or switches is None:
            return "?"
        return f"{float(now.group(1)):.0f} ({float(switches.group(1)):.0f} switches)"

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: no drain delay
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def load(url: str, clients: int, requests: int, gen: int, prompt: list[int], limit: float) -> float:
    """Generated tokens/s of `requests` greedy completions sent by `clients` concurrent clients."""
    args = SimpleNamespace(url=url, clients=clients, requests=requests, time_limit=limit, model=None,
                           prompt_ids=",".join(map(str, prompt)), chat=False, max_tokens=gen,
                           temperature=0.0, seed=None, extra=json.dumps({"ban_eos": True}), stream=False,
                           api_key=None)
    out = asyncio.run(load_run(args))
    if out["errors"] or out["ok"] != requests:
        raise RuntimeError(f"{url}: {clients} clients: {out['ok']}/{requests} ok, errors {out['errors']}")
    return out["generated_tokens_per_s"]


def run_round(configs, model, clients, args, prompt, logs: Path, r: int, results, threads) -> None:
    """One round: each configuration (order rotated by `r`) started, loaded at every client count,
    stopped; tokens/s appended to results[(name, clients)]."""
    k = r % len(configs)
    for name, flags in configs[k:] + configs[:k]:
        busy = _spin() if args.busy_start else None
        server = Server(model, flags, logs / f"{name}-{r}.log")
        try:
            server.wait_ready()
            if busy is not None:
                busy.kill()
                busy.wait()
            threads[name] = server.threads()
            measured = re.findall(r"CPU threads: .*", server.log_path.read_text())
            print(f"  round {r + 1}: {name}: {measured[-1] if measured else 'threads set by flag'}",
                  file=sys.stderr, flush=True)
            load(server.url, 1, 1, args.gen, prompt, args.time_limit)  # warm-up
            for c in clients:
                tps = load(server.url, c, c * args.requests_per_client, args.gen, prompt, args.time_limit)
                results.setdefault((name, c), []).append(tps)
                print(f"  round {r + 1}: {name}, {c} clients: {tps:.2f} tok/s; threads now "
                      f"{server.live_threads()}", file=sys.stderr, flush=True)
            threads[name] += f", then {server.live_threads()}"
        finally:
            if busy is not None and busy.poll() is None:
                busy.kill()
                busy.wait()
            server.stop()


def _spin() -> subprocess.Popen:
    """A process holding one core (a busy loop) until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def parse_configs(args) -> list[tuple[str, list[str]]]:
    configs = []
    for name in filter(None, args.configs.split(",")):
        if name not in PRESETS:
            raise SystemExit(f"unknown configuration {name!r}; presets: {', '.join(PRESETS)}")
        configs.append((name, PRESETS[name]))
    for spec in args.config:
        name, _, flags = spec.partition("=")
        configs.append((name, shlex.split(flags)))
    return configs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the 26M shape, random)")
    ap.add_argument("--ckpt", default=None, help="where the 26M checkpoint is written (default: a temp dir)")
    ap.add_argument("--configs", default="default,threads-1,threads-2", help=f"presets: {', '.join(PRESETS)}")
    ap.add_argument("--config", action="append", default=[], help="NAME='FLAGS': one more configuration")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per load run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--busy-start", action="store_true", help="hold one core with a busy process while each "
                    "server starts (its start-up thread measurement sees the held core), none once it is ready")
    args = ap.parse_args(argv)
    configs = parse_configs(args)
    clients = [int(c) for c in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-http-")
    model = args.model or str(write_checkpoint(Path(args.ckpt or Path(tmp.name) / "llada-26m")))
    prompt = [(7 * i + 3) % 400 for i in range(args.prompt)]
    results, threads = {}, {}
    for r in range(args.rounds):
        run_round(configs, model, clients, args, prompt, Path(tmp.name), r, results, threads)
    print(f"model {model}; gen {args.gen}, prompt {args.prompt} tokens, greedy; median generated tokens/s "
          f"of {args.rounds} rounds; ratio to {configs[0][0]}")
    print("| configuration | flags | threads | " + " | ".join(f"{c} clients" for c in clients) + " |")
    print("|---|---|---|" + "---|" * len(clients))
    rows = []
    for name, flags in configs:
        med = {c: statistics.median(results[(name, c)]) for c in clients}
        base = {c: statistics.median(results[(configs[0][0], c)]) for c in clients}
        cells = [f"{med[c]:.1f} ({med[c] / base[c]:.2f}x)" for c in clients]
        print(f"| {name} | `{' '.join(flags) or '(none)'}` | {threads.get(name)} | " + " | ".join(cells) + " |")
        rows.append(dict(name=name, flags=flags, threads=threads.get(name),
                         tokens_per_s={c: results[(name, c)] for c in clients}))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
