"""Prometheus metrics of one server instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TPF_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)
SPF_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("llada_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue_length = Gauge("llada_queue_length", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("llada_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("llada_batch_size", "Requests advanced by one step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram("llada_step_duration_seconds",
                                       "Duration of one batched denoising step (one forward)",
                                       buckets=STEP_BUCKETS, registry=r)
        self.request_duration = Histogram("llada_request_duration_seconds",
                                          "Time from arrival to the complete answer", ["endpoint"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.first_block = Histogram("llada_time_to_first_block_seconds",
                                     "Time from submission until the first block of the answer is final",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llada_prompt_tokens", "Prompt tokens of completed requests",
                                     registry=r)
        self.generated_tokens = Counter("llada_generated_tokens",
                                        "Answer tokens returned to clients", registry=r)
        self.forwards = Counter("llada_forwards", "Model forwards (batched steps) run", registry=r)
        self.tokens_per_forward = Histogram("llada_tokens_per_forward",
                                            "Per finished request: tokens unmasked per forward it took",
                                            buckets=TPF_BUCKETS, registry=r)
        self.gpu_memory = Gauge("llada_gpu_memory_bytes", "GPU memory allocated by the server (0 on CPU)",
                                registry=r)
        self.step_failures = Counter("llada_step_failures", "Steps that raised (their requests failed)",
                                     registry=r)
        self.score_forwards = Counter("llada_score_forwards", "Packed likelihood-scoring forwards run",
                                      registry=r)
        self.score_tokens = Counter("llada_score_tokens", "Canvas tokens evaluated by likelihood scoring",
                                    registry=r)
        self.draft_steps_accepted = Counter("llada_draft_steps_accepted",
                                            "Exact parallel decoding: steps advanced by accepted drafts "
                                            "(beyond one per request per forward)", registry=r)
        self.draft_rows = Counter("llada_draft_rows", "Exact parallel decoding: draft rows forwarded",
                                  registry=r)
        self.steps_per_forward = Histogram("llada_steps_per_forward",
                                           "Per request per forward: sampler steps it advanced",
                                           buckets=SPF_BUCKETS, registry=r)
        self.device = None

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

    def observe_first_block(self, seconds: float) -> None:
        self.first_block.observe(seconds)

    def observe_finished(self, tokens_per_forward: float) -> None:
        self.tokens_per_forward.observe(tokens_per_forward)

    def set_load(self, waiting: int, running: int) -> None:
        self.queue_length.set(waiting)
        self.running.set(running)

    # Server hooks.
    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if seconds is not None and status == 200:
            self.request_duration.labels(endpoint=endpoint).observe(seconds)

    def usage(self, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def render(self) -> bytes:
        dev = self.device
        if dev is not None and getattr(dev, "type", None) == "cuda":
            import torch

            self.gpu_memory.set(torch.cuda.memory_allocated(dev))
        else:
            self.gpu_memory.set(0)
        return generate_latest(self.registry)
