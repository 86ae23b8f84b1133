"""A real Prometheus scrapes a live llada-serve, configured from deploy/prometheus.yml.

llada-serve runs on the golden tiny checkpoint (CPU) on a free loopback port; Prometheus (the
Debian `prometheus` package) runs on another, with the llada-serve job's targets rewritten to the
test port and 1 s scrape/evaluation intervals, and the alert rules of deploy/prometheus/alerts.yml.
The test sends requests, then reads the `llada_` series, the dashboard's queries, the adapter's
query and the alert rules back through Prometheus's HTTP API.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
import local_stack as ls  # noqa: E402
import system_tools  # noqa: E402

from golden_sets import TINY_LLADA as GOLDEN
K8S = ROOT / "deploy" / "k8s"
SHUTDOWN_GRACE = 5
N_OK = 6
# As in Kubernetes (the key comes from a Secret): /v1/* needs it, Prometheus scrapes /metrics without.
API_KEY = "deploy-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

@pytest.fixture(autouse=True, scope="module")
def _needs_prometheus():
    """Skips the module without a `prometheus` binary (fails under CI=true), saying how to install it."""
    system_tools.require("prometheus")


class Stack:
    server = None
    prom = None
    base = ""
    model = ""
    ok = 0
    bad = 0
    server_log = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert (GOLDEN / "config.json").is_file(), f"golden checkpoint missing at {GOLDEN}"
    work = tmp_path_factory.mktemp("deploy_scrape")
    st = Stack()
    port = ls.free_port()
    st.base = f"http://127.0.0.1:{port}"
    st.server_log = work / "server.log"
    try:
        st.server = ls.start(
            ls.server_command(port, str(GOLDEN), ["--device", "cpu", "--shutdown-grace", str(SHUTDOWN_GRACE),
                                                  "--api-key", API_KEY]),
            st.server_log,
        )
        st.prom = ls.Prometheus(work / "prometheus", f"127.0.0.1:{port}", interval="1s")
        st.prom.wait_ready(timeout=30)
        ls.wait_until(lambda: ls.http("GET", st.base + "/ready", timeout=2)[0] == 200, 180,
                      what="llada-serve /ready", proc=st.server)
        # Prometheus sees the target up before any traffic, so rates cover the requests.
        ls.wait_until(lambda: st.prom.value('up{job="llada-serve"}') == 1.0, 30,
                      what="Prometheus to scrape llada-serve")
        status, models = ls.http("GET", st.base + "/v1/models", timeout=10, headers=AUTH)
        assert status == 200, models
        st.model = models["data"][0]["id"]
        yield st
    except Exception:
        print("---- server log ----\n" + ls.tail(st.server_log))
        if st.prom:
            print("---- prometheus log ----\n" + ls.tail(st.prom.log))
        raise
    finally:
        if st.prom:
            st.prom.stop()
        ls.stop(st.server, timeout=SHUTDOWN_GRACE + 15)


def completion(st: Stack, prompt, max_tokens=8, **extra):
    body = {"model": st.model, "prompt": prompt, "max_tokens": max_tokens, **extra}
    return ls.http("POST", st.base + "/v1/completions", body, timeout=120, headers=AUTH)


@pytest.fixture(scope="module")
def traffic(stack):
    """N_OK good completions in two concurrent waves (so steps batch, and Prometheus sees the
    counters move between scrapes: a labelled series is only exported from its first increment),
    then one rejected request."""
    results = []

    def one(i):
        results.append(completion(stack, [1 + i, 2, 3, 4], max_tokens=8, temperature=0.0))

    for wave in (range(0, N_OK // 2), range(N_OK // 2, N_OK)):
        threads = [threading.Thread(target=one, args=(i,)) for i in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        time.sleep(2.5)  # at least two scrapes at 1 s
    assert len(results) == N_OK and all(s == 200 for s, _ in results), results
    stack.ok = N_OK
    status, body = completion(stack, [1, 2, 3], max_tokens=-5)
    assert 400 <= status < 500, (status, body)
    stack.bad = 1
    stack.bad_status = str(status)
    # Wait (bounded) until Prometheus has scraped the final counts.
    ls.wait_until(
        lambda: (stack.prom.value('sum(llada_requests_total{job="llada-serve"})') or 0) >= N_OK + 1,
        30, what="Prometheus to see every request",
    )
    time.sleep(2.5)  # a couple more scrapes, so rates over short windows have points after the burst
    return stack


def test_target_is_up_and_scraped_from_the_configured_path(stack):
    targets = stack.prom.api("targets")["activeTargets"]
    (t,) = [t for t in targets if t["labels"]["job"] == "llada-serve"]
    assert t["health"] == "up", t
    port = stack.base.rsplit(":", 1)[1]
    assert t["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"
    assert t["labels"]["service"] == "llada-serve"  # the static label from deploy/prometheus.yml


def test_request_counters_read_back_through_prometheus(traffic):
    p = traffic.prom
    by_status = {m["status"]: v for m, v in p.query(
        'sum by (status) (llada_requests_total{job="llada-serve",endpoint="/v1/completions"})')}
    assert by_status.get("200") == N_OK, by_status
    assert by_status.get(traffic.bad_status) == 1, by_status
    # Status labels are HTTP codes, which the alert rules and the dashboard match on.
    assert all(re.fullmatch(r"[1-5]\d\d", s) for s in by_status), by_status
    endpoints = {m["endpoint"] for m, _ in p.query('llada_requests_total{job="llada-serve"}')}
    assert any("completions" in e for e in endpoints), endpoints

    assert p.value('sum(llada_prompt_tokens_total{job="llada-serve"})') >= 4 * N_OK
    generated = p.value('sum(llada_generated_tokens_total{job="llada-serve"})')
    assert N_OK <= generated <= 8 * N_OK
    forwards = p.value('sum(llada_forwards_total{job="llada-serve"})')
    assert forwards >= 1
    assert p.value('sum(llada_step_failures_total{job="llada-serve"})') == 0


def test_gauges_and_histograms_read_back_through_prometheus(traffic):
    p = traffic.prom
    assert p.value('sum(llada_queue_length{job="llada-serve"})') == 0
    assert p.value('sum(llada_running_requests{job="llada-serve"})') == 0
    done = p.value('sum(llada_request_duration_seconds_count{job="llada-serve"})')
    assert done >= N_OK
    assert p.value('sum(llada_time_to_first_block_seconds_count{job="llada-serve"})') >= N_OK
    steps = p.value('sum(llada_step_duration_seconds_count{job="llada-serve"})')
    assert steps >= 1 and p.value('sum(llada_batch_size_count{job="llada-serve"})') >= 1
    # Mean requests per step is between 1 and the number of concurrent requests.
    mean_batch = p.value('sum(llada_batch_size_sum) / sum(llada_batch_size_count)')
    assert 1 <= mean_batch <= N_OK
    tpf = p.value('sum(llada_tokens_per_forward_sum) / sum(llada_tokens_per_forward_count)')
    assert tpf > 0
    # Latency histograms observed real, positive durations.
    assert p.value('sum(llada_request_duration_seconds_sum{job="llada-serve"})') > 0
    assert p.value('sum(llada_step_duration_seconds_sum{job="llada-serve"})') > 0


def test_every_dashboard_query_returns_data(traffic):
    p = traffic.prom
    empty = []
    for title, legend, expr in ls.dashboard_targets(rate_interval="60s", instance=".*"):
        res = p.query(expr)
        if title == "GPU memory":
            assert all(v >= 0 for _, v in res), res  # 0 or absent on CPU
            continue
        if not res:
            empty.append((title, legend, expr))
            continue
        values = [v for _, v in res]
        if title.startswith("Errors"):
            # 0 errors / N requests: a number, not NaN (the request rate is not zero).
            assert all(not math.isnan(v) for v in values), (title, legend, values)
        if title.startswith("Throughput") and legend == "generated":
            assert values[0] > 0, "generated tokens/s is zero after traffic"
        if title == "Request rate by status":
            assert {m["status"] for m, _ in res} >= {"200", traffic.bad_status}
    assert not empty, f"dashboard queries with no data: {empty}"


def test_adapter_rule_query_returns_the_queue_length(traffic):
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    q = (rule["metricsQuery"].replace("<<.Series>>", series)
         .replace("<<.LabelMatchers>>", 'job="llada-serve"').replace("<<.GroupBy>>", "instance"))
    res = traffic.prom.query(q)
    assert len(res) == 1 and res[0][1] >= 0, res


def test_alert_rules_load_and_evaluate_cleanly(traffic):
    groups = traffic.prom.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    wanted = {r["alert"] for g in yaml.safe_load((ls.ALERTS_YML).read_text())["groups"] for r in g["rules"]}
    assert set(rules) == wanted
    for name, r in rules.items():
        assert r["health"] == "ok", (name, r.get("lastError"))
        assert r["lastEvaluation"] != "0001-01-01T00:00:00Z", f"{name} was never evaluated"
    firing = {a["labels"]["alertname"] for a in traffic.prom.api("alerts")["alerts"]}
    assert not firing & {"LladaServeDown", "LladaServeAbsent", "LladaServeHighErrorRate", "LladaServeStepFailures"}


def test_every_series_the_deploy_files_query_is_exported(traffic):
    status, text = ls.http("GET", traffic.base + "/metrics", timeout=5)
    assert status == 200
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)", text, re.M))
    referenced = set()
    for _, _, expr in ls.dashboard_targets():
        referenced |= set(re.findall(r"\bllada_[a-z0-9_]+\b", expr))
    for g in yaml.safe_load(ls.ALERTS_YML.read_text())["groups"]:
        for r in g["rules"]:
            referenced |= set(re.findall(r"\bllada_[a-z0-9_]+\b", r["expr"]))
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    referenced |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert len(referenced) >= 15
    missing = referenced - exported
    assert not missing, f"queried by deploy/ but not exported by the server: {sorted(missing)}"


def test_api_key_guards_the_api_but_not_the_scrape(stack):
    assert ls.http("GET", stack.base + "/v1/models", timeout=10)[0] == 401
    assert stack.prom.value('up{job="llada-serve"}') == 1.0


def test_probe_paths_of_the_manifests_answer_on_the_live_server(stack):
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in c:
            status, _ = ls.http("GET", stack.base + c[kind]["httpGet"]["path"], timeout=5)
            assert status == 200, kind
    status, text = ls.http("GET", stack.base + "/metrics", timeout=5)
    assert status == 200 and "llada_queue_length" in text


def test_server_drains_and_exits_on_sigterm(traffic):
    # Last in the module: a request in flight when SIGTERM arrives still completes, then the server
    # exits within the grace period (what docker stop / Kubernetes rely on).
    result = {}
    t = threading.Thread(target=lambda: result.update(r=completion(traffic, [7, 8, 9], max_tokens=128)))
    t.start()
    def admitted():
        if "r" in result:
            return True
        text = ls.http("GET", traffic.base + "/metrics", timeout=5)[1]
        busy = re.findall(r"^llada_(?:running_requests|queue_length)(?:\{[^}]*\})?\s+([0-9.e+]+)$", text, re.M)
        return sum(float(v) for v in busy) >= 1

    ls.wait_until(admitted, 15, interval=0.02, what="the request to be admitted")
    start = time.monotonic()
    in_flight = "r" not in result
    traffic.server.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    rc = traffic.server.wait(timeout=SHUTDOWN_GRACE + 15)
    assert time.monotonic() - start <= SHUTDOWN_GRACE + 15
    assert in_flight, "the request finished before SIGTERM: the drain was not exercised"
    assert result["r"][0] == 200, result
    assert rc in (0, -signal.SIGTERM), rc
