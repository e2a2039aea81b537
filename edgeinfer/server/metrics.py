"""``GET /metrics``: Prometheus text format, through prometheus-client.

Counters and histograms are kept as requests finish; the gauges (queue,
sequences, KV cells, decode speed, heat) are read from the engine and the
machine at each scrape. Each server has its own registry, so two servers in
one process (as in tests) never mix their figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import hardware

# The *_created series (when each counter was made) only double the page.
disable_created_metrics()

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self, engine_getter):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgeinfer_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("edgeinfer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("edgeinfer_prompt_cached_tokens",
                                     "Prompt tokens whose KV state was reused, not evaluated", registry=r)
        self.generated_tokens = Counter("edgeinfer_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("edgeinfer_time_to_first_token_seconds",
                              "From a request's arrival to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("edgeinfer_inter_token_seconds", "Gap between successive tokens of a stream",
                             buckets=ITL_BUCKETS, registry=r)
        r.register(_Live(engine_getter))

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def finished(self, stats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        if stats.generated_tokens:
            self.ttft.observe(stats.ttft_s)

    def inter_token(self, gap: float, n_tokens: int) -> None:
        """A text event of ``n_tokens`` tokens arrived ``gap`` seconds after
        the one before it (the first gap of a stream is its TTFT, not this)."""
        if n_tokens <= 0:
            return
        per = gap / n_tokens
        for _ in range(n_tokens):
            self.itl.observe(per)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Live:
    """Gauges read at scrape time."""

    def __init__(self, engine_getter):
        self.engine_getter = engine_getter

    def describe(self):
        return []   # collected at scrape time only; nothing to register up front

    def collect(self):
        engine = self.engine_getter()
        yield GaugeMetricFamily("edgeinfer_model_loaded", "1 once the model is loaded and serving",
                                value=0 if engine is None else 1)
        if engine is not None:
            try:
                st = engine.status()
            except Exception:   # closed while the scrape ran
                st = None
            if st is not None:
                info = GaugeMetricFamily("edgeinfer_model_info", "The model served", labels=["model", "native"])
                info.add_metric([engine.name, engine.native.setting], 1)
                yield info
                for name, key, doc in (
                        ("edgeinfer_active_sequences", "active_sequences", "Sequences generating or prefilling"),
                        ("edgeinfer_queue_depth", "queue_depth", "Requests waiting for a sequence"),
                        ("edgeinfer_parallel_sequences", "parallel", "Sequences decoded together at most"),
                        ("edgeinfer_kv_cells_used", "kv_cells_used", "KV cache cells in use"),
                        ("edgeinfer_kv_cells", "n_ctx", "KV cache cells in all (the context)"),
                        ("edgeinfer_decode_tokens_per_second", "decode_tps",
                         "Tokens generated per second over the last 10 s, all streams")):
                    yield GaugeMetricFamily(name, doc, value=st[key])
                for name, key, doc in (
                        ("edgeinfer_prompt_cache_hits", "prompt_cache_hits",
                         "Requests that reused KV state for part of their prompt"),
                        ("edgeinfer_busy_refusals", "busy_refusals", "Requests refused because the queue was full"),
                        ("edgeinfer_scheduler_steps", "steps", "Batched decode steps run")):
                    yield CounterMetricFamily(name, doc, value=st[key])
        temp = hardware.cpu_temperature()
        if temp is not None:
            yield GaugeMetricFamily("edgeinfer_cpu_temperature_celsius", "The hottest CPU sensor", value=temp)
        throttled = hardware.throttling()
        if throttled is not None:
            g = GaugeMetricFamily("edgeinfer_cpu_throttled", "1 while the CPU reports throttling now",
                                  labels=["source"])
            g.add_metric([throttled.get("source", "")], 1 if throttled.get("now") else 0)
            yield g
