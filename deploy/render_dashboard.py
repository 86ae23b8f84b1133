"""Render the Grafana dashboard's panels to a PNG from data a real Prometheus scraped.

Grafana is not needed: every panel of deploy/grafana/dashboards/llada-serve.json is drawn with
matplotlib from Prometheus range queries of the same PromQL, laid out like the dashboard.

By default it starts llada-serve and Prometheus on loopback (deploy/local_stack.py), drives a
varying load for --seconds, then renders:

    python deploy/render_dashboard.py --model tests/golden/tiny-llada --seconds 90 --out docs/dashboard.png

With --prometheus URL it renders the last --seconds from an existing Prometheus instead (for
example the compose stack's http://localhost:9090) and starts nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_stack as ls  # noqa: E402

BG, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff"]


def drive_load(base: str, model: str, seconds: float, vocab: int, seed: int = 0) -> dict:
    """Clients whose number rises and falls over the run; some requests are invalid (4xx)."""
    stop_at = time.monotonic() + seconds
    counts = {"ok": 0, "error": 0}
    lock = threading.Lock()
    max_clients = 6

    def active(i: int) -> bool:
        # Triangle wave of concurrency: 1 -> max_clients -> 1 over the run.
        frac = 1 - (stop_at - time.monotonic()) / seconds
        level = 1 + (max_clients - 1) * (1 - abs(2 * frac - 1))
        return i < level

    def client(i: int):
        r = random.Random(seed * 100 + i)
        while time.monotonic() < stop_at:
            if not active(i):
                time.sleep(0.5)
                continue
            prompt = [r.randrange(1, max(2, vocab - 64)) for _ in range(r.randint(4, 24))]
            max_tokens = r.choice([8, 16, 32, 64])
            if r.random() < 0.05:
                max_tokens = -1  # rejected by validation: shows up as a 4xx
            status, _ = ls.http("POST", base + "/v1/completions",
                                {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                 "temperature": r.choice([0.0, 0.7])}, timeout=120)
            with lock:
                counts["ok" if status == 200 else "error"] += 1
            time.sleep(r.uniform(0.05, 0.4))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(max_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def fmt_unit(unit: str):
    def f(v, _pos=None):
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        if unit == "bytes":
            for u in ("B", "KiB", "MiB", "GiB", "TiB"):
                if abs(v) < 1024:
                    return f"{v:.0f} {u}"
                v /= 1024
            return f"{v:.0f} PiB"
        if unit == "s":
            return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.1f} s"
        suffix = {"tps": " tok/s", "reqps": " req/s", "ops": " ops/s"}.get(unit, "")
        return f"{v:.3g}{suffix}"
    return f


def legend_name(fmt: str, labels: dict) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out or ",".join(f"{k}={v}" for k, v in labels.items())


def render(prom: ls.Prometheus, start: float, end: float, out: Path, subtitle: str, rate_interval: str):
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    from datetime import datetime, timezone

    dash = json.loads(ls.DASHBOARD_JSON.read_text())
    panels = dash["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows / 8 * 3.2 + 0.9  # inches: 3.2 per 8-unit dashboard row, plus the header
    fig = plt.figure(figsize=(16, height), facecolor=BG)
    top = 1 - 0.8 / height
    unit_w, unit_h = 0.98 / 24, (top - 0.01) / rows
    pad_l, pad_r, pad_t, pad_b = 0.055, 0.008, 0.32 / height, 0.28 / height  # room for ticks and title
    step = max(1.0, (end - start) / 300)
    for p in panels:
        g = p["gridPos"]
        x0 = 0.01 + g["x"] * unit_w
        y1 = top - g["y"] * unit_h
        w, h = g["w"] * unit_w, g["h"] * unit_h
        ax = fig.add_axes([x0 + pad_l, y1 - h + pad_b, w - pad_l - pad_r, h - pad_t - pad_b])
        ax.set_facecolor(PANEL)
        for s in ax.spines.values():
            s.set_color(GRID)
        ax.tick_params(colors=MUTED, labelsize=8)
        ax.grid(color=GRID, linewidth=0.6)
        ax.set_title(p["title"], color=TEXT, loc="left", fontsize=11, fontweight="bold", pad=6)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(fmt_unit(unit)))
        n = 0
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$instance", ".*").replace("$model_name", ".*")
            for labels, values in prom.query_range(expr, start, end, step):
                labels = {k: v for k, v in labels.items() if k != "__name__"}
                xs = [datetime.fromtimestamp(ts, timezone.utc) for ts, v in values if v == v]
                ys = [v for ts, v in values if v == v]
                if not xs:
                    continue
                color = COLORS[n % len(COLORS)]
                ax.plot(xs, ys, color=color, linewidth=1.6, label=legend_name(t.get("legendFormat", ""), labels))
                ax.fill_between(xs, ys, color=color, alpha=0.06)
                n += 1
        peak = max([max(line.get_ydata(), default=0) for line in ax.get_lines()], default=0)
        if n == 0 or peak == 0:
            note = "No data" if n == 0 else "all 0 (e.g. GPU memory on a CPU run)"
            ax.text(0.5, 0.5, note, color=MUTED, ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="upper left", fontsize=8, frameon=False, labelcolor=TEXT, ncol=4)
        ax.set_ylim(bottom=0, top=None if peak > 0 else 1)
        if peak == 0:
            ax.set_yticks([0])
        ax.set_xlim(datetime.fromtimestamp(start, timezone.utc), datetime.fromtimestamp(end, timezone.utc))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    fig.text(0.01 + pad_l, 1 - 0.4 / height, dash["title"], color=TEXT, fontsize=16, fontweight="bold")
    fig.text(0.99, 1 - 0.4 / height, subtitle, color=MUTED, fontsize=9, ha="right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=BG)
    plt.close(fig)


class ExistingPrometheus(ls.Prometheus):
    def __init__(self, url: str):  # noqa: D107 - reuse only the query methods
        self.url = url.rstrip("/")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory for the local server (default: embedded model)")
    ap.add_argument("--seconds", type=float, default=90, help="load duration, or window with --prometheus")
    ap.add_argument("--out", type=Path, default=ls.ROOT / "docs" / "dashboard.png")
    ap.add_argument("--prometheus", help="render from this Prometheus instead of starting a stack")
    ap.add_argument("--rate-interval", default="15s", help="what $__rate_interval becomes")
    args = ap.parse_args(argv)

    if args.prometheus:
        end = time.time()
        render(ExistingPrometheus(args.prometheus), end - args.seconds, end, args.out,
               f"from {args.prometheus}", args.rate_interval)
        print(f"wrote {args.out}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="llada-dashboard-"))
    port = ls.free_port()
    base = f"http://127.0.0.1:{port}"
    server = prom = None
    try:
        server = ls.start(ls.server_command(port, args.model, ["--device", "cpu"]), work / "server.log")
        prom = ls.Prometheus(work / "prometheus", f"127.0.0.1:{port}", interval="1s")
        prom.wait_ready()
        ls.wait_until(lambda: ls.http("GET", base + "/ready", timeout=2)[0] == 200, 300,
                      what="llada-serve /ready", proc=server)
        ls.wait_until(lambda: prom.value('up{job="llada-serve"}') == 1.0, 30, what="first scrape")
        _, models = ls.http("GET", base + "/v1/models")
        model = models["data"][0]["id"]
        vocab = 320
        if args.model and (Path(args.model) / "config.json").is_file():
            import json
            vocab = int(json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size", vocab))
            vocab = min(vocab, 30000)
        start = time.time()
        time.sleep(5)
        counts = drive_load(base, model, args.seconds, vocab)
        time.sleep(5)
        end = time.time()
        print(f"load: {counts}")
        render(prom, start, end, args.out,
               f"llada-serve on CPU, model {model!r}, {counts['ok']} completions, scraped every 1 s by Prometheus",
               args.rate_interval)
        print(f"wrote {args.out}")
        return 0
    except Exception:
        print(ls.tail(work / "server.log"), file=sys.stderr)
        raise
    finally:
        if prom:
            prom.stop()
        ls.stop(server)


if __name__ == "__main__":
    sys.exit(main())
