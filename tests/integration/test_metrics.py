"""Prometheus metrics scraped over HTTP from a real server after known traffic."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenrelay_server.telemetry.config import TelemetryConfig
from tokenrelay import AsyncClient, InvalidArgumentError

TTFT_S = 0.03
MAX_TOKENS = 6


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    hits = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert hits, f"no sample {name} {labels}"
    return sum(hits)


async def test_metrics_after_known_requests(synthetic_server_factory) -> None:
    srv = await synthetic_server_factory(telemetry=TelemetryConfig(metrics_port=0), ttft_ms=TTFT_S * 1000,
                                         itl_ms=1.0)
    port = srv.handle.telemetry.metrics_port
    assert port
    n_unary, n_stream = 3, 4
    n = n_unary + n_stream
    prompts = [f"prompt number {i} " * (i + 1) for i in range(n)]
    client_ttft: list[float] = []
    async with AsyncClient(srv.address, timeout=30, retries=0) as client:
        prompt_tokens = sum([len(await client.tokenize(p, add_special_tokens=True)) for p in prompts])

        async def stream(prompt: str) -> None:
            t0 = time.perf_counter()
            async for delta in client.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
                if delta.token_ids and len(client_ttft) < n + 1 and t0:
                    client_ttft.append(time.perf_counter() - t0)
                    t0 = 0.0

        async def unary(prompt: str) -> None:
            t0 = time.perf_counter()
            await client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
            client_ttft.append(time.perf_counter() - t0)  # an upper bound of this request's TTFT

        await asyncio.gather(*(unary(p) for p in prompts[:n_unary]), *(stream(p) for p in prompts[n_unary:]))
        with pytest.raises(InvalidArgumentError):
            await client.generate("bad", max_tokens=0)

        m = await asyncio.to_thread(scrape, port)
        assert value(m, "tokenrelay:request_success_total", finished_reason="length") == n
        for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                     "request_generation_tokens", "request_time_per_output_token_seconds"):
            assert value(m, f"tokenrelay:{hist}_count") == n, hist
        assert value(m, "tokenrelay:generation_tokens_total") == n * MAX_TOKENS
        assert value(m, "tokenrelay:request_generation_tokens_sum") == n * MAX_TOKENS
        assert value(m, "tokenrelay:prompt_tokens_total") == prompt_tokens
        assert value(m, "tokenrelay:inter_token_latency_seconds_count") >= n  # at least one gap per request
        # TTFT: the engine's view is inside the client's, and at least the synthetic engine's delay.
        ttft_sum = value(m, "tokenrelay:time_to_first_token_seconds_sum")
        assert n * TTFT_S * 0.9 <= ttft_sum <= sum(client_ttft)
        assert value(m, "tokenrelay:time_to_first_token_seconds_bucket", le="+Inf") == n
        # The histogram buckets are cumulative and TTFT sits above the engine's delay.
        assert value(m, "tokenrelay:time_to_first_token_seconds_bucket", le="0.01") == 0
        assert value(m, "tokenrelay:grpc_server_handled_total", grpc_method="Generate", grpc_code="OK") == n_unary
        assert value(m, "tokenrelay:grpc_server_handled_total", grpc_method="GenerateStream",
                     grpc_code="OK") == n_stream
        assert value(m, "tokenrelay:grpc_server_handled_total", grpc_method="Generate",
                     grpc_code="INVALID_ARGUMENT") == 1
        assert value(m, "tokenrelay:num_requests_running") == 0
        assert value(m, "tokenrelay:num_requests_waiting") == 0
        assert value(m, "tokenrelay:kv_cache_usage_perc") == 0
        assert value(m, "tokenrelay:num_preemptions_total") == 0
        assert {ls for (name, ls) in m if name == "tokenrelay:e2e_request_latency_seconds_count"} == {
            (("model_name", srv.engine.info().name),)}

        job = (await client.submit("a job", max_tokens=3, ignore_eos=True)).job
        done = await client.wait(job.job_id, timeout=20)
        assert done.state == 3  # JOB_STATE_SUCCEEDED
        m = await asyncio.to_thread(scrape, port)
        assert value(m, "tokenrelay:jobs_submitted_total", tier="standard") == 1
        assert value(m, "tokenrelay:job_attempts_total", tier="standard") == 1
        assert value(m, "tokenrelay:jobs_finished_total", state="succeeded", tier="standard") == 1
        assert value(m, "tokenrelay:request_success_total", finished_reason="length") == n + 1


@pytest.mark.parametrize("synthetic_server", [{"max_pending_requests": 1, "itl_ms": 20.0,
                                               "telemetry": TelemetryConfig(metrics_port=0)}], indirect=True)
async def test_rejections_and_running_gauge(synthetic_server, wait_until) -> None:
    port = synthetic_server.handle.telemetry.metrics_port
    async with AsyncClient(synthetic_server.address, timeout=30, retries=0) as client:
        long = asyncio.create_task(client.generate("x", max_tokens=200, ignore_eos=True))
        await wait_until(lambda: synthetic_server.engine.stats().running == 1)
        m = await asyncio.to_thread(scrape, port)
        assert value(m, "tokenrelay:num_requests_running") == 1
        assert value(m, "tokenrelay:kv_cache_usage_perc") > 0
        with pytest.raises(Exception):
            await client.generate("refused", max_tokens=2)
        long.cancel()
        with pytest.raises(BaseException):
            await long
        await wait_until(lambda: synthetic_server.handle.admission.in_flight == 0)
    m = await asyncio.to_thread(scrape, port)
    assert value(m, "tokenrelay:num_requests_rejected_total", grpc_method="Generate") == 1
    assert value(m, "tokenrelay:request_success_total", finished_reason="cancelled") == 1
