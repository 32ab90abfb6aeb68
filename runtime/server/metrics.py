"""Prometheus metrics, served by prometheus-client on their own HTTP port (`--metrics-port`).

Names are a contract (README "Metrics"); all carry the `quiver_` prefix. Per-adapter series are
bounded: `AdapterLabels` gives at most `--metrics-max-adapter-labels` (N) adapters their own
label value and reports every other adapter as `other`, so thousands of adapters make at most
N + 2 values (N ids, `other`, `__base__` for base-model requests).

The rule: the first N distinct adapters to serve a request (preloaded adapters are usually
first) keep their own label for the life of the process; a series never changes name mid-flight,
and a label once given is never taken back (that would leave stale series behind and grow the
count again). Set N to at least the number of adapters you want to watch one by one. Requests refused for
an adapter that does not exist (NOT_FOUND, a malformed id) are counted under `other` without
claiming a label, so junk ids can never use up the N.

vLLM's names, beside ours, for the Kubernetes inference gateway's model-server protocol (its
endpoint picker scrapes them from /metrics on the HTTP port): `vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (0..1) and `vllm:lora_requests_info`,
one series whose labels list the adapters running and waiting (comma-separated ids) and whose
value is the unix time of the last change; a changed set replaces the old series (no stale
ones); `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` (tokens, counters, as vLLM names
them: exposed with the `_total` suffix), which the gateway's prefix-cache scorer reads. They are updated on the engine thread after each step, so a scrape only reads values.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import (CollectorRegistry, GCCollector, Gauge, Histogram, Info,
                               PlatformCollector, ProcessCollector, start_http_server)
from prometheus_client import Counter as PCounter

BASE_LABEL = "__base__"
OTHER_LABEL = "other"

#: LLM latencies span milliseconds (a decode step) to minutes (a long generation under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OUTCOMES = ("ok", "cancelled", "error", "rejected")
STATES = ("host", "device", "loading")
#: "unknown": an adapter still loading (its config is not read yet).
TYPES = ("lora", "dora", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning", "unknown")
#: OpenAI's fine-tuning job statuses (quiver_training_jobs{status})
TRAINING_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
#: "missing": the adapter directory disappeared while it was being read.
LOAD_FAILURE_REASONS = ("format", "path", "missing", "io", "busy", "other")


class AdapterLabels:
    """Maps adapter ids to a bounded set of label values (see the module docstring)."""

    def __init__(self, max_labels: int):
        self.max_labels = max_labels
        # Only the labelled ids are remembered: a per-id record of every adapter ever seen would
        # grow without bound on a server whose adapters come and go (soak test).
        self._labelled: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter_id: str | None) -> str:
        """The label for `adapter_id`; "" is the base model, None an adapter that does not exist."""
        if adapter_id is None:
            return OTHER_LABEL
        if not adapter_id:
            return BASE_LABEL
        with self._lock:
            if adapter_id in self._labelled:
                return adapter_id
            if len(self._labelled) < self.max_labels:
                self._labelled.add(adapter_id)
                return adapter_id
            return OTHER_LABEL


def adapter_type(peft_type: str, use_dora: bool) -> str:
    """The `type` label of an adapter: its PEFT type, DoRA told apart from plain LoRA."""
    if peft_type == "LORA":
        return "dora" if use_dora else "lora"
    return peft_type.lower() or "unknown"


class Metrics:
    """Every Quiver metric, in its own registry (plus process and Python collectors)."""

    def __init__(self, max_adapter_labels: int = 64, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.label = AdapterLabels(max_adapter_labels)
        a = ("adapter",)
        self.requests = PCounter("quiver_requests_total", "Requests by adapter and outcome",
                                 ("adapter", "outcome"), registry=r)
        self.prompt_tokens = PCounter("quiver_prompt_tokens_total", "Prompt tokens processed", a, registry=r)
        self.generated_tokens = PCounter("quiver_generated_tokens_total", "Tokens generated", a, registry=r)
        self.ttft = Histogram("quiver_time_to_first_token_seconds", "Arrival to first generated token",
                              a, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("quiver_time_per_output_token_seconds",
                              "Mean time between generated tokens of a request, after the first",
                              a, buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("quiver_request_duration_seconds", "Arrival to last token", a,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("quiver_queue_duration_seconds", "Arrival to admission into the batch",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("quiver_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("quiver_requests_waiting", "Requests queued for admission", registry=r)
        self.batch_size = Histogram("quiver_batch_size", "Rows (requests) per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("quiver_batch_tokens", "Tokens per engine step",
                                      buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.step_seconds = Histogram("quiver_step_duration_seconds", "Engine step wall time",
                                      buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("quiver_kv_cache_usage_ratio", "Fraction of the KV cache budget in use", registry=r)
        self.kv_bytes = Gauge("quiver_kv_cache_bytes",
                              "Bytes the KV pool holds (it doubles up to --kv-cache-tokens)", registry=r)
        self.preemptions = PCounter("quiver_preemptions_total", "Sequences preempted for KV room", registry=r)
        self.prefix_queries = PCounter("quiver_prefix_cache_queries_total",
                                       "Prompt tokens looked up in the prefix cache at admission",
                                       registry=r)
        self.prefix_hits = PCounter("quiver_prefix_cache_hits_total",
                                    "Prompt tokens found in the prefix cache (not computed)", registry=r)
        self.prefix_blocks = Gauge("quiver_prefix_cache_blocks",
                                   "KV blocks in the prefix cache (held by requests or evictable)",
                                   registry=r)
        self.adapters = Gauge("quiver_adapters", "Adapters by residency state and type",
                              ("state", "type"), registry=r)
        self.adapter_load = Histogram("quiver_adapter_load_seconds", "Reading + validating an adapter",
                                      ("type",), buckets=LOAD_BUCKETS, registry=r)
        self.evictions = PCounter("quiver_adapter_evictions_total", "Adapters moved from device to host",
                                  registry=r)
        self.load_failures = PCounter("quiver_adapter_load_failures_total", "Adapter loads that failed",
                                      ("reason",), registry=r)
        for reason in LOAD_FAILURE_REASONS:  # every reason present from the start, at 0
            self.load_failures.labels(reason)
        self.auth_refusals = PCounter("quiver_auth_refusals_total",
                                      "Calls refused by access control (missing / wrong token)",
                                      ("service", "code"), registry=r)
        self._vllm(r)
        self._training(r)
        self.base_info = Info("quiver_base_model", "The base model served", registry=r)
        self.base_bytes = Gauge("quiver_base_model_bytes", "Resident bytes of the base model",
                                ("part",), registry=r)

    def _vllm(self, r: CollectorRegistry) -> None:
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch", registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0..1 (1 = full)", registry=r)
        self.vllm_lora = Gauge("vllm:lora_requests_info", "Running / waiting adapters; value: time of last change",
                               ("max_lora", "running_lora_adapters", "waiting_lora_adapters"), registry=r)
        self.vllm_prefix_queries = PCounter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in prompt tokens", registry=r)
        self.vllm_prefix_hits = PCounter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in prompt tokens", registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_lock = threading.Lock()

    def _training(self, r: CollectorRegistry) -> None:
        """Fine-tuning jobs inside the server (runtime/training)."""
        self.training_job_count = Gauge("quiver_training_jobs", "Fine-tuning jobs by status",
                                        ("status",), registry=r)
        for status in TRAINING_STATUSES:
            self.training_job_count.labels(status)
        self.training_tokens = PCounter("quiver_training_tokens_total",
                                        "Tokens trained on by fine-tuning jobs", registry=r)
        self.training_step_seconds = Histogram("quiver_training_step_seconds",
                                               "Wall time of one training slice (one optimizer step)",
                                               buckets=LATENCY_BUCKETS, registry=r)

    # ---- recorders -------------------------------------------------------------------------
    def training_jobs(self, counts: dict[str, int]) -> None:
        """counts[status] -> jobs; statuses absent are 0."""
        for status in TRAINING_STATUSES:
            self.training_job_count.labels(status).set(counts.get(status, 0))

    def training_step(self, seconds: float, tokens: int) -> None:
        self.training_step_seconds.observe(seconds)
        self.training_tokens.inc(tokens)

    def request_done(self, adapter_id: str | None, outcome: str, prompt_tokens: int, generated: int,
                     ttft_s: float | None, duration_s: float, queue_s: float | None) -> None:
        label = self.label(adapter_id)
        self.requests.labels(label, outcome).inc()
        if prompt_tokens and outcome != "rejected":
            self.prompt_tokens.labels(label).inc(prompt_tokens)
        if generated:
            self.generated_tokens.labels(label).inc(generated)
        if outcome == "ok" and ttft_s is not None:
            self.ttft.labels(label).observe(ttft_s)
            self.duration.labels(label).observe(duration_s)
            if generated > 1:
                self.tpot.labels(label).observe((duration_s - ttft_s) / (generated - 1))
        if queue_s is not None:
            self.queue.observe(queue_s)

    def step(self, rows: int, tokens: int, seconds: float, preempted: int) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(tokens)
        self.step_seconds.observe(seconds)
        if preempted:
            self.preemptions.inc(preempted)

    def engine_state(self, running: int, waiting: int, kv_usage: float, kv_bytes: int = 0) -> None:
        self.kv_bytes.set(kv_bytes)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.vllm_running.set(running)
        self.vllm_waiting.set(waiting)
        self.vllm_kv_usage.set(kv_usage)

    def prefix_cache(self, queries: int, hits: int, cached_blocks: int) -> None:
        """queries / hits: tokens since the last call (counters); cached_blocks: now."""
        if queries:
            self.prefix_queries.inc(queries)
            self.vllm_prefix_queries.inc(queries)
        if hits:
            self.prefix_hits.inc(hits)
            self.vllm_prefix_hits.inc(hits)
        self.prefix_blocks.set(cached_blocks)

    def lora_state(self, max_lora: int, running: set[str], waiting: set[str]) -> None:
        """vllm:lora_requests_info: one series; a new label set replaces the old one."""
        labels = (str(max_lora), ",".join(sorted(running)), ",".join(sorted(waiting)))
        with self._lora_lock:
            if labels == self._lora_labels:
                return
            if self._lora_labels is not None:
                self.vllm_lora.remove(*self._lora_labels)
            self.vllm_lora.labels(*labels).set(time.time())
            self._lora_labels = labels

    def adapters_resident(self, counts: dict[tuple[str, str], int]) -> None:
        """counts[(state, type)] -> number; absent pairs are set to 0 (series stay present)."""
        for state in STATES:
            for kind in TYPES:
                self.adapters.labels(state, kind).set(counts.get((state, kind), 0))

    def adapter_loaded(self, type_label: str, seconds: float) -> None:
        self.adapter_load.labels(type_label).observe(seconds)

    def adapter_load_failed(self, reason: str) -> None:
        """reason: one of LOAD_FAILURE_REASONS."""
        self.load_failures.labels(reason).inc()

    def auth_refused(self, service: str, code: str) -> None:
        """service: the gRPC service's full name (two values); code: the status name."""
        self.auth_refusals.labels(service, code).inc()

    def adapter_evicted(self) -> None:
        self.evictions.inc()

    def set_base(self, describe: dict, nbytes: dict[str, int]) -> None:
        self.base_info.info({k: str(v) for k, v in describe.items()})
        for part, n in nbytes.items():
            self.base_bytes.labels(part).set(n)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint (a daemon thread); returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
