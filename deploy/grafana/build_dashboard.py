"""Writes deploy/grafana/dashboards/llada-serve.json (the Grafana dashboard of the compose stack).

Edit the panels here and run `python deploy/grafana/build_dashboard.py`; tests/test_deploy.py checks
the committed JSON is what this script writes.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "llada-serve.json"
DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance",model_name=~"$model_name"'
RI = "$__rate_interval"

def t(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}

def q(p, m, by="le"):
    return f'histogram_quantile({p}, sum by ({by}) (rate({m}_bucket{{{SEL}}}[{RI}])))'

panels = [
  ("Throughput (tokens/s)", "Tokens per second: generated (output) and prompt (input), summed over instances.", "tps", [
    t(f'sum(rate(llada_generated_tokens_total{{{SEL}}}[{RI}]))', "generated", "A"),
    t(f'sum(rate(llada_prompt_tokens_total{{{SEL}}}[{RI}]))', "prompt", "B")]),
  ("Request rate by status", "Finished HTTP requests per second by status code.", "reqps", [
    t(f'sum by (status) (rate(llada_requests_total{{{SEL}}}[{RI}]))', "{{status}}", "A")]),
  ("Errors (share of requests)", "Share of requests answered with a 5xx (server errors) and a 4xx (client errors, queue full).", "percentunit", [
    t(f'(sum(rate(llada_requests_total{{{SEL},status=~"5.."}}[{RI}])) or vector(0)) / sum(rate(llada_requests_total{{{SEL}}}[{RI}]))', "5xx", "A"),
    t(f'(sum(rate(llada_requests_total{{{SEL},status=~"4.."}}[{RI}])) or vector(0)) / sum(rate(llada_requests_total{{{SEL}}}[{RI}]))', "4xx", "B")]),
  ("Request latency percentiles", "End-to-end request duration, p50 / p90 / p99 over all endpoints.", "s", [
    t(q("0.5", "llada_request_duration_seconds"), "p50", "A"),
    t(q("0.9", "llada_request_duration_seconds"), "p90", "B"),
    t(q("0.99", "llada_request_duration_seconds"), "p99", "C")]),
  ("Time to first block", "Time from arrival to the first completed block (what a streaming client waits for), p50 / p99.", "s", [
    t(q("0.5", "llada_time_to_first_block_seconds"), "p50", "A"),
    t(q("0.99", "llada_time_to_first_block_seconds"), "p99", "B")]),
  ("Queue length", "Requests waiting for a batch slot, and requests being generated.", "short", [
    t(f'sum(llada_queue_length{{{SEL}}})', "waiting", "A"),
    t(f'sum(llada_running_requests{{{SEL}}})', "running", "B")]),
  ("Running batch size", "Requests per engine step: mean and p90 of the batch each forward served.", "short", [
    t(f'sum(rate(llada_batch_size_sum{{{SEL}}}[{RI}])) / sum(rate(llada_batch_size_count{{{SEL}}}[{RI}]))', "mean", "A"),
    t(q("0.9", "llada_batch_size"), "p90", "B")]),
  ("Tokens per forward", "Tokens unmasked per forward a request took (above 1 with parallel decoding), mean over finished requests; and generated tokens per batched forward (parallel decoding times batching).", "short", [
    t(f'sum(rate(llada_tokens_per_forward_sum{{{SEL}}}[{RI}])) / sum(rate(llada_tokens_per_forward_count{{{SEL}}}[{RI}]))', "per request (mean)", "A"),
    t(f'sum(rate(llada_generated_tokens_total{{{SEL}}}[{RI}])) / sum(rate(llada_forwards_total{{{SEL}}}[{RI}]))', "generated / batched forward", "B")]),
  ("Step latency", "Duration of one engine step (one forward plus selection), p50 / p99.", "s", [
    t(q("0.5", "llada_step_duration_seconds"), "p50", "A"),
    t(q("0.99", "llada_step_duration_seconds"), "p99", "B")]),
  ("Forwards and step failures", "Forward passes (NFE) per second and failed steps per second.", "ops", [
    t(f'sum(rate(llada_forwards_total{{{SEL}}}[{RI}]))', "forwards/s", "A"),
    t(f'sum(rate(llada_step_failures_total{{{SEL}}}[{RI}]))', "failed steps/s", "B")]),
  ("GPU memory", "GPU memory held by the server process, per instance (absent or 0 on CPU).", "bytes", [
    t(f'llada_gpu_memory_bytes{{{SEL}}}', "{{instance}}", "A")]),
  ("Queue time", "Per generation: time from submission until it joined the running batch, p50 / p99.", "s", [
    t(q("0.5", "llada_request_queue_time_seconds"), "p50", "A"),
    t(q("0.99", "llada_request_queue_time_seconds"), "p99", "B")]),
  ("Time to first token", "Per generation: time from submission until its first answer token is final (what a streaming client waits for), p50 / p99.", "s", [
    t(q("0.5", "llada_time_to_first_token_seconds"), "p50", "A"),
    t(q("0.99", "llada_time_to_first_token_seconds"), "p99", "B")]),
  ("KV-buffer usage", "Share of the KV/canvas buffer rows (--max-batch-tokens) the running batch holds, per instance.", "percentunit", [
    t(f'llada_kv_buffer_usage_ratio{{{SEL}}}', "{{instance}}", "A")]),
  ("Finished reasons", "Generations ending per second by reason: stop (EOS or a stop string), length (max_tokens), abort (client went away), error.", "ops", [
    t(f'sum by (reason) (rate(llada_request_finished_total{{{SEL}}}[{RI}]))', "{{reason}}", "A")]),
  ("Tokens per request", "Prompt and generated tokens per successful request, p50 / p90.", "short", [
    t(q("0.5", "llada_request_prompt_tokens"), "prompt p50", "A"),
    t(q("0.9", "llada_request_prompt_tokens"), "prompt p90", "B"),
    t(q("0.5", "llada_request_generation_tokens"), "generated p50", "C"),
    t(q("0.9", "llada_request_generation_tokens"), "generated p90", "D")]),
  ("Process memory", "Resident memory of each server process (process_resident_memory_bytes), labelled with the model and version it serves (llada_build_info).", "bytes", [
    t(f'process_resident_memory_bytes{{instance=~"$instance"}} * on (instance) group_left (model_name, version) llada_build_info{{{SEL}}}', "{{instance}} {{model_name}} {{version}}", "A")]),
]

out = []
for i, (title, desc, unit, targets) in enumerate(panels):
    last = i == len(panels) - 1 and len(panels) % 2 == 1
    out.append({
        "id": i + 1, "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": 8, "w": 24 if last else 12, "x": 0 if (last or i % 2 == 0) else 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": {"lineWidth": 2, "fillOpacity": 10, "showPoints": "never"}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": targets,
    })

dash = {
    "uid": "llada-serve", "title": "llada-serve", "description": "Throughput, latency, queueing and engine behaviour of llada-serve.",
    "tags": ["llada-serve", "llm"], "timezone": "browser", "editable": True, "graphTooltip": 1,
    "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
    "templating": {"list": [{
        "name": "model_name", "label": "model", "type": "query", "datasource": DS,
        "query": {"query": "label_values(llada_build_info, model_name)", "refId": "model_name"},
        "definition": "label_values(llada_build_info, model_name)",
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}, {
        "name": "instance", "label": "instance", "type": "query", "datasource": DS,
        "query": {"query": "label_values(llada_build_info{model_name=~\"$model_name\"}, instance)", "refId": "instance"},
        "definition": "label_values(llada_build_info{model_name=~\"$model_name\"}, instance)",
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}]},
    "annotations": {"list": []},
    "panels": out,
}


def render() -> str:
    return json.dumps(dash, indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
