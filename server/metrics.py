"""Prometheus metrics of one server instance (its own registry, so tests can build many apps).

Every `llada_` series carries a `model_name` label (the served model id), as vLLM's and SGLang's
do; the registry also holds prometheus-client's process and platform collectors (`process_*`,
`python_info`). The README's metrics table lists exactly what `/metrics` exposes (a test compares
them).
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# No `_created` series: a series per counter and histogram that no dashboard or alert here reads.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Tokens per forward is often exactly a small integer (1 at one token per step, 2 or 4 with fixed
# parallel schedules): each such value sits in the middle of its own narrow bucket, so a quantile
# interpolated inside the bucket reads the value itself (an edge at exactly 1.0 made every request
# at one token per step read p50 = 0.75).
TPF_BUCKETS = (0.5, 0.9, 1.1, 1.5, 1.9, 2.1, 2.9, 3.1, 3.9, 4.1, 6, 7.9, 8.1, 12, 16, 32)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FINISH_REASONS = ("stop", "length", "abort", "error")
SPF_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # steps per request per forward (exact parallel decoding)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llada-serve")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "llada",
                 process_metrics: bool = True):
        r = self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        m = ["model_name"]

        def bound(metric):
            return metric.labels(model_name=model_name)

        self.requests = Counter("llada_requests_total", "HTTP responses by endpoint and status code",
                                m + ["endpoint", "status"], registry=r)
        self.queue_length = bound(Gauge("llada_queue_length", "Requests waiting for a batch slot", m, registry=r))
        self.running = bound(Gauge("llada_running_requests", "Requests in the running batch", m, registry=r))
        self.kv_usage = bound(Gauge("llada_kv_buffer_usage_ratio",
                                    "Share of the KV/canvas buffer rows (--max-batch-tokens) held by the "
                                    "running batch, 0..1", m, registry=r))
        self.batch_size = bound(Histogram("llada_batch_size", "Requests advanced by one step", m,
                                          buckets=BATCH_BUCKETS, registry=r))
        self.step_duration = bound(Histogram("llada_step_duration_seconds",
                                             "Duration of one batched denoising step (one forward)", m,
                                             buckets=STEP_BUCKETS, registry=r))
        self.request_duration = Histogram("llada_request_duration_seconds",
                                          "End-to-end latency of successful requests: arrival to the last "
                                          "byte of the answer", m + ["endpoint"], buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.queue_time = bound(Histogram("llada_request_queue_time_seconds",
                                          "Per generation: time from submission until it joined the "
                                          "running batch", m, buckets=LATENCY_BUCKETS, registry=r))
        self.first_token = bound(Histogram("llada_time_to_first_token_seconds",
                                           "Per generation: time from submission until the first answer "
                                           "token is committed and final (what a streaming client waits for)",
                                           m, buckets=LATENCY_BUCKETS, registry=r))
        self.first_block = bound(Histogram("llada_time_to_first_block_seconds",
                                           "Per generation: time from submission until the first block of "
                                           "the answer is final", m, buckets=LATENCY_BUCKETS, registry=r))
        self.request_prompt_tokens = bound(Histogram("llada_request_prompt_tokens",
                                                     "Prompt tokens per successful request", m,
                                                     buckets=TOKEN_BUCKETS, registry=r))
        self.request_generation_tokens = bound(Histogram("llada_request_generation_tokens",
                                                         "Answer tokens per successful generation request "
                                                         "(all its choices)", m, buckets=TOKEN_BUCKETS,
                                                         registry=r))
        self.finished = Counter("llada_request_finished_total",
                                "Generations (choices) by how they ended: stop (EOS or a stop string), "
                                "length (max_tokens), abort (the client went away), error", m + ["reason"],
                                registry=r)
        self.prompt_tokens = bound(Counter("llada_prompt_tokens", "Prompt tokens of successful requests", m,
                                           registry=r))
        self.generated_tokens = bound(Counter("llada_generated_tokens", "Answer tokens returned to clients", m,
                                              registry=r))
        self.forwards = bound(Counter("llada_forwards", "Model forwards (batched steps) run", m, registry=r))
        self.tokens_per_forward = bound(Histogram("llada_tokens_per_forward",
                                                  "Per finished request: tokens unmasked per forward it took", m,
                                                  buckets=TPF_BUCKETS, registry=r))
        self.gpu_memory = bound(Gauge("llada_gpu_memory_bytes", "GPU memory allocated by the server (0 on CPU)", m,
                                      registry=r))
        self.step_failures = bound(Counter("llada_step_failures", "Steps that raised (their requests failed)", m,
                                           registry=r))
        self.score_forwards = bound(Counter("llada_score_forwards", "Packed likelihood-scoring forwards run", m,
                                            registry=r))
        self.score_tokens = bound(Counter("llada_score_tokens", "Canvas tokens evaluated by likelihood scoring", m,
                                          registry=r))
        self._drafting_metrics(bound, m, r)
        self._thread_metrics(bound, m, r)
        self.build_info = Gauge("llada_build_info", "Always 1: the server's version, the served model and where "
                                "it runs", m + ["version", "family", "device", "dtype", "torch_version"], registry=r)
        for reason in FINISH_REASONS:  # every reason exposed from the start (0 until it happens)
            self.finished.labels(model_name=model_name, reason=reason)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.device = None
        self.tensor_parallel_size = bound(Gauge("llada_tensor_parallel_size",
                                                "Ranks the model is sharded over (1: one device)", m, registry=r))
        self.tensor_parallel_size.set(1)
        self.rank_memory = Gauge("llada_rank_memory_bytes", "Per tensor-parallel rank: GPU memory "
                                 "allocated (resident memory on a CPU), as last reported", m + ["rank"], registry=r)
        self.ranks = None  # tensor parallel: a callable giving {rank: memory bytes}

    def _drafting_metrics(self, bound, m, r) -> None:
        """Exact parallel decoding (draft_depth)."""
        self.draft_steps_accepted = bound(Counter("llada_draft_steps_accepted",
                                                  "Exact parallel decoding: steps advanced by accepted drafts "
                                                  "(beyond one per request per forward)", m, registry=r))
        self.draft_rows = bound(Counter("llada_draft_rows", "Exact parallel decoding: draft rows forwarded", m,
                                        registry=r))
        self.steps_per_forward = bound(Histogram("llada_steps_per_forward",
                                                 "Per request per forward: sampler steps it advanced", m,
                                                 buckets=SPF_BUCKETS, registry=r))

    def _thread_metrics(self, bound, m, r) -> None:
        """The CPU intra-op thread count (sampler/thread_tuner.py)."""
        self.cpu_threads = bound(Gauge("llada_cpu_threads", "Intra-op CPU threads the engine's steps run on "
                                       "(the latest step's size; on a CPU chosen at start-up, then while "
                                       "serving)", m, registry=r))
        self.cpu_thread_switches = bound(Counter("llada_cpu_thread_switches", "Changes of the intra-op CPU "
                                                 "thread count while serving", m, registry=r))

    def describe(self, bundle) -> None:
        """Fill llada_build_info from the loaded model."""
        import torch

        self.device = bundle.model.device
        self.build_info.labels(model_name=self.model_name, version=_version(), family=str(bundle.config.family),
                               device=str(getattr(bundle.device, "type", bundle.device)),
                               dtype=str(bundle.dtype).replace("torch.", ""),
                               torch_version=torch.__version__).set(1)

    # Engine hooks (called from the engine thread; prometheus_client is thread safe).
    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_duration.observe(seconds)
        self.forwards.inc()

    def observe_request_forward(self, steps: int, draft_rows: int) -> None:
        self.steps_per_forward.observe(steps)
        self.draft_steps_accepted.inc(steps - 1)
        self.draft_rows.inc(draft_rows)

    def observe_score_forward(self, tokens: int, seconds: float) -> None:
        self.score_forwards.inc()
        self.score_tokens.inc(tokens)

    def observe_step_failure(self, n_requests: int) -> None:
        self.step_failures.inc()

    def observe_queued(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.first_token.observe(seconds)

    def observe_first_block(self, seconds: float) -> None:
        self.first_block.observe(seconds)

    def observe_finished(self, tokens_per_forward: float) -> None:
        self.tokens_per_forward.observe(tokens_per_forward)

    def set_load(self, waiting: int, running: int) -> None:
        self.queue_length.set(waiting)
        self.running.set(running)

    def set_kv_usage(self, rows_used: int, capacity: int) -> None:
        self.kv_usage.set(rows_used / capacity if capacity else 0.0)

    def set_cpu_threads(self, n: int) -> None:
        self.cpu_threads.set(n)

    def observe_cpu_thread_switch(self) -> None:
        self.cpu_thread_switches.inc()

    # Server hooks (server.guards.Guards counts every response once).
    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(model_name=self.model_name, endpoint=endpoint, status=str(status)).inc()
        if seconds is not None and status == 200:
            self.request_duration.labels(model_name=self.model_name, endpoint=endpoint).observe(seconds)

    def usage(self, prompt_tokens: int, generated_tokens: int | None) -> None:
        """A successful request's tokens (`generated_tokens` None: a scoring request)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        if generated_tokens is not None:
            self.generated_tokens.inc(generated_tokens)
            self.request_generation_tokens.observe(generated_tokens)

    def finished_reason(self, reason: str, n: int = 1) -> None:
        self.finished.labels(model_name=self.model_name, reason=reason).inc(n)

    def render(self) -> bytes:
        dev = self.device
        if dev is not None and getattr(dev, "type", None) == "cuda":
            import torch

            self.gpu_memory.set(torch.cuda.memory_allocated(dev))
        else:
            self.gpu_memory.set(0)
        if self.ranks is not None:
            for rank, n in self.ranks().items():
                self.rank_memory.labels(model_name=self.model_name, rank=str(rank)).set(n)
        return generate_latest(self.registry)
