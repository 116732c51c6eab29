"""Prometheus metrics with vLLM's names under the `tokenrelay:` prefix, one registry per server.

Request histograms and token counters are fed by the instrumented engine (one observation
per request from the engine's RequestMetrics, one inter-token latency per output delta);
running / waiting / KV-cache usage / preemptions are read from engine.stats() at scrape time,
on the event loop; gRPC calls are counted by the telemetry interceptor; jobs by the
instrumented job store. Labels are bounded: model, finish reason, method, code, job state
and tier, webhook outcome, and the tenant only with --metrics-tenant-labels.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenrelay_engines.base import EngineStats, FinishReason, RequestOutput

log = logging.getLogger(__name__)
PREFIX = "tokenrelay:"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5,
            2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
              0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


def _token_buckets(limit: int = 1 << 17) -> tuple[float, ...]:
    out, scale = [], 1
    while scale <= limit:
        out.extend(m * scale for m in (1, 2, 5) if m * scale <= limit)
        scale *= 10
    return tuple(float(v) for v in out)


class _EngineCollector(Collector):
    """Engine gauges, sampled on the event loop (engine.stats() is not thread-safe)."""

    def __init__(self, stats: Callable[[], EngineStats], loop: asyncio.AbstractEventLoop,
                 model: Callable[[], str]) -> None:
        self._stats = stats
        self._loop = loop
        self._model = model

    async def _sample(self) -> EngineStats:
        return self._stats()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            stats = asyncio.run_coroutine_threadsafe(self._sample(), self._loop).result(timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the loop is busy
            log.warning("engine stats unavailable for this scrape: %s", type(exc).__name__)
            return
        labels = ["model_name"]
        values = [self._model()]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        yield gauge("num_requests_running", "Requests in the engine's running batch.", stats.running)
        yield gauge("num_requests_waiting", "Requests waiting for the engine to schedule them.", stats.waiting)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", usage)
        c = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions by the engine's scheduler.",
                                labels=labels)
        c.add_metric(values, stats.num_preemptions)
        yield c


class LoopHistogram(Collector):
    """A histogram observed on the event loop only (per output delta, per request), so it must be
    cheap: plain counters written by the loop thread only (no lock: a scrape reads a snapshot that may
    be one observation behind). Exposed through prometheus-client's HistogramMetricFamily."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], model: Callable[[], str]) -> None:
        self._name, self._doc, self._model = name, doc, model
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self._bounds), "+Inf"], counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(self._name, self._doc, labels=["model_name"])
        family.add_metric([self._model()], buckets, total)
        yield family


class Metrics:
    """Owns the registry, every metric of the server, and the /metrics HTTP server."""

    def __init__(self, model_name: str = "", *, tenant_labels: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.tenant_labels = tenant_labels
        r, m = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> LoopHistogram:
            h = LoopHistogram(PREFIX + name, doc, buckets, lambda: self.model_name)
            r.register(h)
            return h

        # Observed on the event loop only (by the instrumented engine): lock-free LoopHistograms,
        # labelled with the model when scraped (a prometheus-client Histogram costs ~3 us an
        # observation, and a request makes nine: observe_finished 29 -> 10 us).
        self.c_ttft = hist("time_to_first_token_seconds", "Time to first token: arrival to first token.", _LATENCY)
        self.c_itl = hist("inter_token_latency_seconds", "Time between successive outputs of a request.", _TOKEN_GAP)
        self.c_tpot = hist("request_time_per_output_token_seconds", "Decode time per output token after the "
                           "first, per request.", _TOKEN_GAP)
        self.c_e2e = hist("e2e_request_latency_seconds", "End-to-end request latency in the engine.", _LATENCY)
        self.c_queue = hist("request_queue_time_seconds", "Time waiting before first scheduled.", _LATENCY)
        self.c_inference = hist("request_inference_time_seconds", "Time from first scheduled to finished.",
                                _LATENCY)
        self.c_prefill = hist("request_prefill_time_seconds", "Time from first scheduled to first token.",
                              _LATENCY)
        self.c_decode = hist("request_decode_time_seconds", "Time from first token to finished.", _LATENCY)
        self.c_prompt_hist = hist("request_prompt_tokens", "Prompt tokens per request.", _token_buckets())
        self.c_gen_hist = hist("request_generation_tokens", "Generated tokens per request.", _token_buckets())
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               m + ["finished_reason"], registry=r)
        call = ["grpc_service", "grpc_method"] + (["tenant"] if tenant_labels else [])
        self.handled = Counter(PREFIX + "grpc_server_handled", "RPCs completed, by method and status code.",
                               call + ["grpc_code"], registry=r)
        self.rejected = Counter(PREFIX + "num_requests_rejected", "Calls refused with RESOURCE_EXHAUSTED "
                                "(server queue or tenant quota full).", call, registry=r)
        self.jobs_submitted = Counter(PREFIX + "jobs_submitted", "Jobs created, by tier.", ["tier"], registry=r)
        self.jobs_finished = Counter(PREFIX + "jobs_finished", "Jobs that reached a final state, by state "
                                     "and tier.", ["state", "tier"], registry=r)
        self.job_attempts = Counter(PREFIX + "job_attempts", "Job attempts started, by tier.", ["tier"],
                                    registry=r)
        self.webhook_deliveries = Counter(PREFIX + "webhook_deliveries", "Webhook delivery attempts by "
                                          "outcome (success, http_error, network_error).", ["outcome"],
                                          registry=r)
        self._handled_by_key: dict[tuple[str, str, str], Any] = {}
        self._bind_model()
        self._http = None
        self.port: int | None = None

    def _bind_model(self) -> None:
        name = self.model_name
        self.c_prompt, self.c_gen = self.prompt_tokens.labels(name), self.generation_tokens.labels(name)
        self.c_success = {reason: self.success.labels(name, reason.value) for reason in FinishReason}

    def set_model(self, model_name: str) -> None:
        """The model label (known once the engine has started); the placeholder series go."""
        if model_name == self.model_name:
            return
        old, self.model_name = self.model_name, model_name
        for metric in (self.prompt_tokens, self.generation_tokens):
            metric.remove(old)
        for reason in FinishReason:
            self.success.remove(old, reason.value)
        self._bind_model()

    def watch_engine(self, stats: Callable[[], EngineStats], loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(_EngineCollector(stats, loop, lambda: self.model_name))

    # -- observations ------------------------------------------------------------------------
    def observe_finished(self, out: RequestOutput) -> None:
        """One finished request: its timings, token counts and finish reason."""
        if out.finish_reason is not None:
            self.c_success[out.finish_reason].inc()
        m, usage = out.metrics, out.usage
        if usage is not None:
            self.c_prompt.inc(usage.prompt_tokens)
            self.c_prompt_hist.observe(usage.prompt_tokens)
            self.c_gen_hist.observe(usage.completion_tokens)
        if m is None:
            return
        self.c_e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.c_queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            self.c_inference.observe(max(0.0, m.finished_time - m.first_scheduled_time))
        if m.first_token_time is not None:
            self.c_ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            if m.first_scheduled_time is not None:
                self.c_prefill.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
            decode = max(0.0, m.finished_time - m.first_token_time)
            self.c_decode.observe(decode)
            if usage is not None and usage.completion_tokens > 1:
                self.c_tpot.observe(decode / (usage.completion_tokens - 1))

    def observe_cancelled(self) -> None:
        """A request whose caller went away before its final output."""
        self.c_success[FinishReason.CANCELLED].inc()

    def observe_generated(self, tokens: int) -> None:
        """Tokens one request generated (counted once, when it ends, to keep the per-token path cheap)."""
        if tokens:
            self.c_gen.inc(tokens)

    def observe_call(self, method: str, code: str, tenant: str) -> None:
        key = (method, code, tenant if self.tenant_labels else "")
        child = self._handled_by_key.get(key)
        if child is None:  # bounded as the labels are: served methods x codes (x tenants)
            child = self._handled_by_key[key] = self.handled.labels(*self._call_labels(method, tenant), code)
        child.inc()
        if code == "RESOURCE_EXHAUSTED":
            self.rejected.labels(*self._call_labels(method, tenant)).inc()

    def _call_labels(self, method: str, tenant: str) -> tuple[str, ...]:
        service, _, name = method.lstrip("/").partition("/")
        return (service, name, tenant) if self.tenant_labels else (service, name)

    # -- the HTTP endpoint --------------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = server.server_address[1]
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
