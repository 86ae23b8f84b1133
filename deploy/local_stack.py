"""Run llada-serve and a real Prometheus on loopback, wired like deploy/compose.yaml.

Used by tests/test_deploy_scrape.py and deploy/render_dashboard.py. Only the standard library,
PyYAML and the `prometheus` binary (Debian package `prometheus`) are needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "llada-serve.json"
JOB = "llada-serve"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )


def http(method: str, url: str, body: dict | None = None, timeout: float = 60.0, headers=None):
    """(status, parsed JSON or text). HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_until(pred, timeout: float, interval: float = 0.25, what: str = "condition", proc=None):
    """Poll pred() until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {what}")
        try:
            value = pred()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")


def prometheus_config(target: str, rules_file: Path, interval: str = "1s") -> dict:
    """deploy/prometheus.yml with its llada-serve targets replaced by `target` (host:port)."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg.setdefault("global", {})
    cfg["global"]["scrape_interval"] = interval
    cfg["global"]["evaluation_interval"] = interval
    cfg["rule_files"] = [str(rules_file)]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    if len(jobs) != 1:
        raise ValueError(f"deploy/prometheus.yml must have exactly one {JOB!r} job")
    for sc in jobs[0]["static_configs"]:
        sc["targets"] = [target]
    return cfg


def server_command(port: int, model: str | None, extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port)]
    if model:
        cmd += ["--model", str(model)]
    return cmd + list(extra or [])


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLADA_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start(cmd: list[str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            cmd, cwd=cwd, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        log.close()


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> int | None:
    """SIGTERM the process group we started, SIGKILL it if it outlives `timeout`."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    return proc.returncode


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping one llada-serve target."""

    def __init__(self, workdir: Path, target: str, interval: str = "1s"):
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("the `prometheus` binary is not installed")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        rules = self.workdir / "alerts.yml"
        shutil.copyfile(ALERTS_YML, rules)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(prometheus_config(target, rules, interval)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / "prometheus.log"
        self.proc = start(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.log,
            cwd=self.workdir,
        )

    def wait_ready(self, timeout: float = 30.0):
        wait_until(lambda: http("GET", self.url + "/-/ready", timeout=2)[0] == 200,
                   timeout, what="Prometheus /-/ready", proc=self.proc)

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http("GET", url, timeout=10)
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            raise ValueError(f"Prometheus API {path} {params}: HTTP {status}: {body}")
        return body["data"]

    def query(self, expr: str) -> list:
        """Instant vector result: list of (labels, float value)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step))
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None when the result is empty."""
        res = self.query(expr)
        if not res:
            return None
        if len(res) != 1:
            raise ValueError(f"{expr} returned {len(res)} series")
        return res[0][1]

    def stop(self):
        return stop(self.proc)


def dashboard_targets(rate_interval: str = "30s", instance: str = ".*"):
    """(panel title, legend, PromQL) for every target of the Grafana dashboard, with the
    dashboard variables ($instance, $__rate_interval) substituted."""
    dash = json.loads(DASHBOARD_JSON.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$instance", instance)
            expr = expr.replace("$model_name", ".*")
            out.append((panel["title"], t.get("legendFormat", ""), expr))
    return out
