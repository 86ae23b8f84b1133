"""Static checks of the deployment files: Dockerfile (hadolint), compose, Prometheus config and
alert rules (promtool), Grafana provisioning and dashboard, Kubernetes manifests.

The live scrape by a real Prometheus is in tests/test_deploy_scrape.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llada-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

sys.path.insert(0, str(DEPLOY))
import local_stack  # noqa: E402
import system_tools  # noqa: E402

# The server's contract (docs/ARCHITECTURE.md, issue "serving"): port, probe paths, metrics, env.
SERVER_PORT = 8000
HEALTH_PATH, READY_PATH, METRICS_PATH = "/health", "/ready", "/metrics"
SERVER_METRICS = {
    "llada_requests_total": "counter",
    "llada_queue_length": "gauge",
    "llada_running_requests": "gauge",
    "llada_batch_size": "histogram",
    "llada_step_duration_seconds": "histogram",
    "llada_request_duration_seconds": "histogram",
    "llada_time_to_first_block_seconds": "histogram",
    "llada_prompt_tokens_total": "counter",
    "llada_generated_tokens_total": "counter",
    "llada_forwards_total": "counter",
    "llada_tokens_per_forward": "histogram",
    "llada_gpu_memory_bytes": "gauge",
    "llada_step_failures_total": "counter",
    "llada_kv_buffer_usage_ratio": "gauge",
    "llada_request_queue_time_seconds": "histogram",
    "llada_time_to_first_token_seconds": "histogram",
    "llada_request_prompt_tokens": "histogram",
    "llada_request_generation_tokens": "histogram",
    "llada_request_finished_total": "counter",
    "llada_build_info": "gauge",
}
# env var -> CLI flag
SERVER_ENV = {
    "LLADA_MODEL": "--model",
    "LLADA_HOST": "--host",
    "LLADA_PORT": "--port",
    "LLADA_DEVICE": "--device",
    "LLADA_DTYPE": "--dtype",
    "LLADA_SERVED_MODEL_NAME": "--served-model-name",
    "LLADA_MAX_BATCH_SIZE": "--max-batch-size",
    "LLADA_MAX_BATCH_TOKENS": "--max-batch-tokens",
    "LLADA_MAX_QUEUE": "--max-queue",
    "LLADA_REQUEST_TIMEOUT": "--request-timeout",
    "LLADA_API_KEY": "--api-key",
    "LLADA_SHUTDOWN_GRACE": "--shutdown-grace",
}
APP_LABELS = {"app.kubernetes.io/name": "llada-serve", "app.kubernetes.io/component": "server"}


def metric_family(name: str) -> str:
    """Map a sample name used in PromQL to the server's metric family name."""
    if name in SERVER_METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and SERVER_METRICS.get(base) == "histogram":
            return base
    return name


def promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bllada_[a-z0-9_]+\b", expr))


def load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus Compose's `!reset` / `!override` merge tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_scalar(node),
)


def tool(name: str) -> str:
    """A system binary: skips without it (fails under CI=true), saying how to install it."""
    return system_tools.require(name)


# --------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Guard against a hadolint that accepts anything (so the test above means something).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    r = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL" in r.stdout


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes)
        if p.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, p[3:]) for part in parts)
        if hit:
            result = not neg
    return result


def test_dockerfile_copies_what_exists_and_is_not_dockerignored():
    patterns = dockerignore_patterns()
    copies = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies, "Dockerfile copies nothing"
    sources = []
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        sources += args[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not ignored(src, patterns), f"{src} is copied but excluded by .dockerignore"
    # The install needs the metadata and every package pyproject.toml lists.
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"packages\s*=\s*\[([^\]]*)\]", pyproject).group(1)
    for pkg in re.findall(r'"([^".]+)(?:\.[^"]*)?"', packages):
        assert pkg in sources, f"package {pkg} is not copied into the image"
    assert "pyproject.toml" in sources
    readme = re.search(r'readme\s*=\s*"([^"]+)"', pyproject)
    if readme:
        assert readme.group(1) in sources, "pyproject's readme must be in the image for pip install"
    # The embedded default model ships inside the image when present.
    default_weights = ROOT / "weights" / "default"
    if default_weights.exists():
        assert not ignored("weights/default/model.safetensors", patterns)
    # And the context stays small: tests, docs, .git are left out.
    for heavy in (".git", "tests", "docs", "bench"):
        assert ignored(heavy, patterns), f"{heavy} should be in .dockerignore"


def test_dockerfile_runtime_contract():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    frm = [rest for w, rest in ins if w == "FROM"]
    assert len(frm) >= 1 and "cuda" in frm[-1].lower() and "torch" in frm[-1].lower(), frm
    assert ":" in frm[-1] and not frm[-1].endswith(":latest"), "base image must be pinned"

    # Non-root user, set after the install.
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")

    # Exec-form entrypoint, a console script of pyproject.toml, so SIGTERM reaches the server.
    entry = [rest for w, rest in ins if w == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert argv[0] == "llada-serve" and re.search(r'^llada-serve\s*=\s*"server\.cli:main"', pyproject, re.M)
    stopsignal = [rest for w, rest in ins if w == "STOPSIGNAL"]
    assert stopsignal in ([], ["SIGTERM"])

    env = {}
    for w, rest in ins:
        if w == "ENV":
            for k, v in re.findall(r"(\w+)=(\S+)", rest):
                env[k] = v
    assert env.get("LLADA_HOST") == "0.0.0.0", "must listen on all interfaces in the container"
    assert int(env.get("LLADA_PORT", SERVER_PORT)) == SERVER_PORT
    assert {k for k in env if k.startswith("LLADA_")} <= set(SERVER_ENV)
    assert "LLADA_MODEL" not in env or env["LLADA_MODEL"].startswith("/models")

    exposed = [rest for w, rest in ins if w == "EXPOSE"]
    assert exposed == [str(SERVER_PORT)]
    volumes = [rest for w, rest in ins if w == "VOLUME"]
    assert volumes and "/models" in volumes[0]

    health = [rest for w, rest in ins if w == "HEALTHCHECK"]
    assert len(health) == 1 and HEALTH_PATH in health[0] and "CMD" in health[0]
    assert "LLADA_PORT" in health[0] or str(SERVER_PORT) in health[0]


def test_dockerfile_healthcheck_command_is_valid_python():
    health = [rest for w, rest in dockerfile_instructions() if w == "HEALTHCHECK"][0]
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")


# ------------------------------------------------------------------------------ Prometheus


def test_prometheus_config_is_valid():
    r = subprocess.run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


def test_prometheus_scrapes_the_compose_service():
    cfg = load_yaml(DEPLOY / "prometheus.yml")[0]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["llada-serve"]
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    compose = yaml.load((DEPLOY / "compose.yaml").read_text(), Loader=ComposeLoader)
    assert targets == [f"llada-serve:{SERVER_PORT}"] and "llada-serve" in compose["services"]


def test_alert_rules_pass_promtool():
    r = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_unit_tests():
    r = subprocess.run([tool("promtool"), "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: Bad\n    expr: sum(rate(llada_requests_total[5m])\n")
    r = subprocess.run([tool("promtool"), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_alerts_cover_the_operational_failures():
    groups = load_yaml(ALERTS)[0]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    by_name = {r["alert"]: r for r in rules}
    assert 'up{job="llada-serve"} == 0' in by_name["LladaServeDown"]["expr"]
    assert "llada_requests_total" in by_name["LladaServeHighErrorRate"]["expr"]
    assert "5.." in by_name["LladaServeHighErrorRate"]["expr"]
    assert "llada_queue_length" in by_name["LladaServeQueueSaturated"]["expr"]
    assert "llada_request_duration_seconds_bucket" in by_name["LladaServeHighLatency"]["expr"]
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"]
        for m in promql_metrics(r["expr"]):
            assert metric_family(m) in SERVER_METRICS, f"alert {r['alert']} uses unknown metric {m}"


# --------------------------------------------------------------------------------- Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_has_the_operator_panels():
    titles = [p["title"] for p in dashboard()["panels"]]
    wanted = {
        "throughput": "llada_generated_tokens_total",
        "status": "llada_requests_total",
        "error": "llada_requests_total",
        "latency": "llada_request_duration_seconds_bucket",
        "queue": "llada_queue_length",
        "batch size": "llada_batch_size",
        "tokens per forward": "llada_tokens_per_forward",
        "step latency": "llada_step_duration_seconds_bucket",
        "gpu memory": "llada_gpu_memory_bytes",
    }
    panels = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"]}
    for word, metric in wanted.items():
        matching = [t for t in titles if word in t.lower()]
        assert matching, f"no dashboard panel about {word!r} in {titles}"
        assert any(metric in panels[t] for t in matching), f"panel {matching} does not query {metric}"


def test_dashboard_queries_are_valid_promql_on_server_metrics(tmp_path):
    targets = local_stack.dashboard_targets(rate_interval="5m")
    assert len(targets) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:target_{i}", "expr": expr} for i, (_, _, expr) in enumerate(targets)
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    used = set()
    for title, _, expr in targets:
        ms = promql_metrics(expr)
        assert ms, f"panel {title!r} queries no llada_ metric: {expr}"
        for m in ms:
            assert metric_family(m) in SERVER_METRICS, f"panel {title!r} uses unknown metric {m}"
            used.add(metric_family(m))
    # Every metric the server exports is on the dashboard somewhere.
    assert used == set(SERVER_METRICS), set(SERVER_METRICS) - used


def test_dashboard_wiring():
    dash = dashboard()
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    # Panels must not overlap on the grid.
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine
    prov = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "llada-serve.yml")[0]
    (provider,) = prov["providers"]
    compose = yaml.load((DEPLOY / "compose.yaml").read_text(), Loader=ComposeLoader)
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --------------------------------------------------------------------------------- Compose


def compose() -> dict:
    return yaml.load((DEPLOY / "compose.yaml").read_text(), Loader=ComposeLoader)


def test_compose_services_and_gpu():
    c = compose()
    assert set(c["services"]) == {"llada-serve", "prometheus", "grafana"}
    srv = c["services"]["llada-serve"]
    assert (DEPLOY / srv["build"]["context"] / srv["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    (dev,) = srv["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert srv["ports"] == [f"${{LLADA_PUBLISH_PORT:-{SERVER_PORT}}}:{SERVER_PORT}"]
    env = srv["environment"]
    assert set(env) <= set(SERVER_ENV)
    assert env["LLADA_HOST"] == "0.0.0.0" and int(env["LLADA_PORT"]) == SERVER_PORT
    # The model directory is a read-only volume at /models; LLADA_MODEL points into it.
    vols = [v for v in srv["volumes"] if v.endswith(":/models:ro")]
    assert len(vols) == 1 and "/models" in env["LLADA_MODEL"]
    assert (DEPLOY / "models").is_dir()
    # Graceful stop: docker waits longer than the server's drain.
    grace = int(env["LLADA_SHUTDOWN_GRACE"])
    assert srv["stop_signal"] == "SIGTERM" and int(srv["stop_grace_period"].rstrip("s")) > grace
    assert srv["init"] is True
    assert READY_PATH in " ".join(srv["healthcheck"]["test"]) or HEALTH_PATH in " ".join(srv["healthcheck"]["test"])
    for name in ("prometheus", "grafana"):
        image = c["services"][name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name} image must be pinned: {image}"


def test_compose_mounts_exist():
    for name, svc in compose()["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name} mounts {src}, which does not exist"
    prom = compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    cfg_in_container = mounts["./prometheus.yml"]
    assert f"--config.file={cfg_in_container}" in prom["command"]
    # rule_files are relative to the config file; the alerts must be found at the same place.
    rule = load_yaml(DEPLOY / "prometheus.yml")[0]["rule_files"][0]
    in_container = str(Path(cfg_in_container).parent / rule)
    rules_dir = [h for h, c in mounts.items() if in_container.startswith(c + "/")]
    assert rules_dir and (DEPLOY / rules_dir[0] / Path(in_container).relative_to(mounts[rules_dir[0]])).is_file()


def test_compose_cpu_override_drops_the_gpu():
    over = yaml.load((DEPLOY / "compose.cpu.yaml").read_text(), Loader=ComposeLoader)
    srv = over["services"]["llada-serve"]
    assert srv["deploy"] is None and srv["environment"]["LLADA_DEVICE"] == "cpu"


# ------------------------------------------------------------------------------ Kubernetes


def k8s_docs() -> dict[tuple[str, str], dict]:
    kust = load_yaml(K8S / "kustomization.yaml")[0]
    docs = {}
    for res in kust["resources"]:
        for d in load_yaml(K8S / res):
            key = (d["kind"], d["metadata"]["name"])
            assert key not in docs, f"duplicate {key}"
            docs[key] = d
    return docs


def test_k8s_every_file_parses_and_is_listed():
    kust = load_yaml(K8S / "kustomization.yaml")[0]
    listed = set(kust["resources"])
    for f in sorted(K8S.glob("*.yaml")):
        docs = load_yaml(f)
        assert docs, f"{f.name} is empty"
        if f.name in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
            continue
        assert f.name in listed, f"{f.name} is not in kustomization.yaml"
        for d in docs:
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"]
    kinds = {k for k, _ in k8s_docs()}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
                     "ServiceMonitor", "PodDisruptionBudget", "PersistentVolumeClaim"}


def test_k8s_core_objects_match_the_kubernetes_schema():
    try:
        import kubernetes_validate as kv  # bundles the Kubernetes OpenAPI schemas: works offline
    except ImportError:  # pragma: no cover
        pytest.fail("pip install kubernetes-validate (schema check of the manifests)")
    checked = 0
    for (kind, name), d in k8s_docs().items():
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD; its fields are checked in test_k8s_servicemonitor
        kv.validate(d, "1.30.0", strict=True)
        checked += 1
    assert checked >= 6


def container(docs) -> dict:
    dep = docs[("Deployment", "llada-serve")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_deployment_probes_ports_and_gpu():
    docs = k8s_docs()
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": SERVER_PORT}
    cm = docs[("ConfigMap", "llada-serve-config")]["data"]
    assert int(cm["LLADA_PORT"]) == SERVER_PORT and cm["LLADA_HOST"] == "0.0.0.0"

    def probe_port(p):
        port = p["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert c["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert c.get("startupProbe", {}).get("httpGet", {}).get("path", HEALTH_PATH) == HEALTH_PATH
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in c:
            assert probe_port(c[kind]) == SERVER_PORT, kind

    for section in ("requests", "limits"):
        assert str(c["resources"][section]["nvidia.com/gpu"]) == "1"


def test_k8s_config_secret_and_model_volume():
    docs = k8s_docs()
    dep = docs[("Deployment", "llada-serve")]
    c = container(docs)
    refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    assert refs == ["llada-serve-config"] and ("ConfigMap", refs[0]) in docs
    cm = docs[("ConfigMap", "llada-serve-config")]["data"]
    assert set(cm) <= set(SERVER_ENV), set(cm) - set(SERVER_ENV)
    env = {e["name"]: e for e in c.get("env", [])}
    key = env["LLADA_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "LLADA_API_KEY" not in cm, "the API key belongs in the Secret, not the ConfigMap"
    # The Secret is created by the operator; the docs give the exact command with this name and key.
    doc = (ROOT / "README.md").read_text()
    assert f"create secret generic {key['name']}" in doc and f"--from-literal={key['key']}=" in doc

    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    model_mount = [m for p, m in mounts.items() if cm["LLADA_MODEL"].startswith(p.rstrip("/") + "/")]
    assert len(model_mount) == 1 and model_mount[0]["readOnly"] is True
    claim = volumes[model_mount[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    # readOnlyRootFilesystem needs writable scratch for the kernel caches the image points at.
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts and "/home/llada/.cache" in mounts
    pod_sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0


def test_k8s_graceful_termination_covers_the_drain():
    docs = k8s_docs()
    pod = docs[("Deployment", "llada-serve")]["spec"]["template"]["spec"]
    c = container(docs)
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = int(cmd[1])
    grace = int(docs[("ConfigMap", "llada-serve-config")]["data"]["LLADA_SHUTDOWN_GRACE"])
    assert pre_stop > 0 and pre_stop + grace < pod["terminationGracePeriodSeconds"]
    # Rolling updates never take a serving pod away before its replacement is ready.
    strategy = docs[("Deployment", "llada-serve")]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_labels_and_selectors_agree():
    docs = k8s_docs()
    dep = docs[("Deployment", "llada-serve")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert APP_LABELS.items() <= pod_labels.items()

    svc = docs[("Service", "llada-serve")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (sport,) = svc["spec"]["ports"]
    cport_names = {p["name"] for p in container(docs)["ports"]}
    assert sport["targetPort"] in cport_names or sport["targetPort"] == SERVER_PORT

    pdb = docs[("PodDisruptionBudget", "llada-serve")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    sm = docs[("ServiceMonitor", "llada-serve")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == sport["name"] and ep["path"] == METRICS_PATH

    hpa = docs[("HorizontalPodAutoscaler", "llada-serve")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in docs and ref["apiVersion"] == dep["apiVersion"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_hpa_metric_is_served_by_the_adapter_and_the_server():
    docs = k8s_docs()
    hpa = docs[("HorizontalPodAutoscaler", "llada-serve")]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "llada_queue_length" and SERVER_METRICS[name] == "gauge"

    values = load_yaml(K8S / "prometheus-adapter-values.yaml")[0]
    rules = values["rules"]["custom"]
    exposed = []
    for rule in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        as_name = re.sub(rule["name"]["matches"], rule["name"]["as"], series)
        exposed.append(as_name)
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
        for tmpl in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert tmpl in rule["metricsQuery"]
    assert name in exposed


def test_k8s_servicemonitor_and_service_match_the_scrape_config():
    docs = k8s_docs()
    sm = docs[("ServiceMonitor", "llada-serve")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    (ep,) = sm["spec"]["endpoints"]
    assert re.fullmatch(r"\d+s", ep["interval"])
    svc = docs[("Service", "llada-serve")]
    assert svc["spec"]["ports"][0]["port"] == SERVER_PORT


# ---------------------------------------------------------------------- against the server


def server_sources() -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((ROOT / "server").rglob("*.py")))


def test_server_defines_the_metrics_and_paths_the_deploy_files_use():
    src = server_sources()
    declared = {m for m in re.findall(r"""["'](llada_[a-z0-9_]+)["']""", src)}
    declared |= {m + "_total" for m in declared}
    for name in SERVER_METRICS:
        assert name in declared, f"server/ does not declare metric {name} used by deploy/"
    for path in (HEALTH_PATH, READY_PATH, METRICS_PATH):
        assert re.search(rf"""["']{re.escape(path)}["']""", src), f"server/ has no route {path}"


def test_server_cli_accepts_every_flag_the_deploy_files_set():
    r = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=local_stack.clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    used = set()
    used |= set(compose()["services"]["llada-serve"]["environment"])
    used |= set(k8s_docs()[("ConfigMap", "llada-serve-config")]["data"])
    used |= {"LLADA_API_KEY", "LLADA_HOST", "LLADA_PORT", "LLADA_SHUTDOWN_GRACE"}
    for env in sorted(used):
        assert SERVER_ENV[env] in r.stdout, f"{env}: `llada-serve --help` has no {SERVER_ENV[env]}"


def test_dashboard_json_is_what_its_builder_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render() == DASHBOARD.read_text(), "run python deploy/grafana/build_dashboard.py"
