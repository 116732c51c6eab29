"""`tokenrelay bench`: a gRPC load generator for any tokenrelay server.

Closed loop (`--concurrency 1,4,16`: that many requests always in flight) or open loop
(`--rate 2,8`: seeded arrivals, requests/s, Poisson or gamma with `--burstiness`), each point
bounded by `--num-requests` and/or `--duration`. Every request is a GenerateStream call, so
token arrivals are timed on the client: TTFT, inter-token latency (gaps between deltas that
carry tokens), TPOT ((e2e - ttft) / (n - 1)), end-to-end latency (mean, standard deviation,
`--percentiles`), request / output / total token throughput and goodput under SLOs;
`--plot DIR` draws them (tokenrelay._plots).

    python -m tokenrelay.loadgen --target localhost:50051 --concurrency 1,4 --num-requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from tokenrelay._aio import AsyncClient
from tokenrelay._bench_config import BenchConfig, add_bench_arguments, config_from_args
from tokenrelay._prompts import Prompt, load_dataset, random_token_prompts
from tokenrelay._report import ProgressBar, format_point, format_sweep
from tokenrelay._stats import PointResult, RequestRecord, summarize_point
from tokenrelay.cli._output import enum_name, jsonable
from tokenrelay.errors import TokenRelayError
from tokenrelay.v1 import generation_pb2

__all__ = ["BenchConfig", "BenchReport", "LoadGenerator", "add_bench_arguments", "config_from_args",
           "main", "run_bench"]

_GOOD_FINISH = frozenset({"length", "eos", "stop"})
_PROMPT_POOL = 1024  # prompts generated for a duration-bounded point (reused round robin)


@dataclass(slots=True)
class BenchReport:
    target: str
    model: dict[str, Any]
    config: dict[str, Any]
    points: list[PointResult] = field(default_factory=list)
    records: list[list[RequestRecord]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        points = []
        for point, records in zip(self.points, self.records):
            entry = point.to_dict()
            entry["requests"] = [
                {"ok": r.ok, "error": r.error, "prompt_tokens": r.prompt_tokens,
                 "output_tokens": r.output_tokens, "ttft_ms": _ms(r.ttft), "tpot_ms": _ms(r.tpot),
                 "e2e_ms": _ms(r.e2e), "start_s": r.start - records[0].start if records else 0.0}
                for r in records]
            points.append(entry)
        return _json_safe({"target": self.target, "model": self.model, "config": self.config,
                           "points": points})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class _Workload:
    """Prompts and output lengths for one point, drawn from a seeded RNG."""

    def __init__(self, config: BenchConfig, info: Any, file_prompts: list[Prompt] | None,
                 point_seed: int) -> None:
        count = config.num_requests or _PROMPT_POOL
        rng = random.Random(point_seed)
        if file_prompts is not None:
            self.prompts: list[Prompt] = [file_prompts[i % len(file_prompts)] for i in range(count)]
        else:
            self.prompts = list(random_token_prompts(
                count, config.input_len, info.vocab_size, list(info.eos_token_ids), rng))
        self.output_lens = [config.output_len.draw(rng) for _ in range(count)]

    def __getitem__(self, index: int) -> tuple[Prompt, int]:
        i = index % len(self.prompts)
        return self.prompts[i], self.output_lens[i]


def arrival_offsets(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds from the start of a point at which requests arrive: gamma-distributed gaps with
    mean 1/rate and shape `burstiness` (1: exponential gaps, a Poisson process; below 1 the
    gaps' coefficient of variation 1/sqrt(burstiness) grows: bursts and lulls)."""
    scale = 1.0 / (rate * burstiness)
    offset = 0.0
    while True:
        offset += rng.gammavariate(burstiness, scale)
        yield offset


class LoadGenerator:
    """Runs a BenchConfig against one server: warm-up, then each sweep point in turn."""

    def __init__(self, config: BenchConfig, *, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> None:
        self.config = config
        self.out = out
        self.err = err

    async def run(self) -> BenchReport:
        config = self.config
        sec = config.security
        plot = _plotter(config)
        # no retries: a benchmark measures what the server does, each request once
        keywords: dict[str, Any] = {"metadata": config.metadata, "credentials": sec.credentials(),
                                    "options": sec.options(), "api_key": sec.api_key, "max_retries": 0}
        async with AsyncClient(config.target, **{k: v for k, v in keywords.items() if v is not None}) as client:
            info = await client.info(timeout=config.request_timeout)
            self._check_lengths(info)
            file_prompts = load_dataset(config.dataset_name, config.prompt_file)
            report = BenchReport(config.target, jsonable(info), config.to_dict())
            warm = _Workload(config, info, file_prompts, config.seed)
            for i in range(config.warmup):
                await self._request(client, warm[i][0], 2)
            points = [("concurrency", float(c)) for c in config.concurrency]
            points += [("rate", float(r)) for r in config.rates]
            for index, (mode, value) in enumerate(points):
                workload = _Workload(config, info, file_prompts, config.seed + index)
                label = f"concurrency {int(value)}" if mode == "concurrency" else f"rate {value:g}/s"
                progress = ProgressBar(label, self.err, total=config.num_requests,
                                       duration=config.duration, enabled=config.progress)
                if mode == "concurrency":
                    records, duration = await self._closed_loop(client, workload, int(value), progress)
                else:
                    records, duration = await self._open_loop(client, workload, value, index, progress)
                progress.finish()
                point = summarize_point(
                    mode, value, records, max(duration, 1e-9),
                    slo_ttft=_seconds(config.slo_ttft_ms), slo_tpot=_seconds(config.slo_tpot_ms),
                    percentiles=config.percentiles)
                report.points.append(point)
                report.records.append(sorted(records, key=lambda r: r.start))
                print(format_point(point), file=self.out, flush=True)
            if len(report.points) > 1:
                print(format_sweep(report.points), file=self.out, flush=True)
        if config.json_out:
            with open(config.json_out, "w", encoding="utf-8") as handle:
                json.dump(report.to_dict(), handle, indent=2)
        if plot is not None and config.plot_dir:
            for path in plot(report, config.plot_dir):
                print(f"plot: {path}", file=self.out, flush=True)
        return report

    def _check_lengths(self, info: Any) -> None:
        config = self.config
        longest = config.output_len.high + (config.input_len.high if config.dataset_name == "random" else 0)
        if info.context_length and longest > info.context_length:
            raise ValueError(f"input-len + output-len can reach {longest} tokens, more than the "
                             f"model's context length {info.context_length}")

    async def _request(self, client: AsyncClient, prompt: Prompt, output_len: int) -> RequestRecord:
        """One timed GenerateStream request; failures become records, never exceptions."""
        config = self.config
        token_times: list[float] = []
        output_tokens = 0
        error = ""
        start = time.perf_counter()
        stream = client.stream(prompt, max_tokens=output_len, ignore_eos=True,
                               temperature=config.temperature, timeout=config.request_timeout)
        try:
            async for delta in stream:
                if delta.token_ids:
                    token_times.append(time.perf_counter())
                    output_tokens += len(delta.token_ids)
            reason = stream.finish_reason
            name = enum_name(reason, generation_pb2.FinishReason, "FINISH_REASON_") if reason is not None else ""
            if name not in _GOOD_FINISH:
                error = f"FINISH_REASON_{name.upper()}" if name else "NO_FINISH_EVENT"
        except TokenRelayError as exc:
            error = exc.code.name
        finally:
            end = time.perf_counter()
            await stream.aclose()
        if stream.usage is not None and stream.usage.completion_tokens:
            output_tokens = stream.usage.completion_tokens
        prompt_tokens = stream.started.prompt_tokens if stream.started is not None else (
            len(prompt) if isinstance(prompt, list) else 0)
        return RequestRecord(start=start, end=end, prompt_tokens=prompt_tokens,
                             token_times=token_times, output_tokens=output_tokens, error=error)

    def _time_left(self, t0: float) -> bool:
        return self.config.duration is None or time.perf_counter() - t0 < self.config.duration

    async def _closed_loop(self, client: AsyncClient, workload: _Workload, concurrency: int,
                           progress: ProgressBar) -> tuple[list[RequestRecord], float]:
        records: list[RequestRecord] = []
        counter = itertools.count()
        limit = self.config.num_requests
        t0 = time.perf_counter()

        async def worker() -> None:
            while self._time_left(t0):
                index = next(counter)
                if limit is not None and index >= limit:
                    return
                record = await self._request(client, *workload[index])
                records.append(record)
                progress.update(record.ok)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - t0

    async def _open_loop(self, client: AsyncClient, workload: _Workload, rate: float,
                         index: int, progress: ProgressBar) -> tuple[list[RequestRecord], float]:
        config = self.config
        rng = random.Random(f"arrivals-{config.seed}-{index}")
        limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        records: list[RequestRecord] = []

        async def fire(i: int) -> None:
            async with limit if limit is not None else contextlib.nullcontext():
                record = await self._request(client, *workload[i])
            records.append(record)
            progress.update(record.ok)

        tasks = []
        t0 = time.perf_counter()
        arrivals = arrival_offsets(rate, config.burstiness, rng)
        try:
            for i in itertools.count():
                if config.num_requests is not None and i >= config.num_requests:
                    break
                arrival = next(arrivals)
                if config.duration is not None and arrival >= config.duration:
                    break
                delay = t0 + arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival schedule itself, not synchronisation
                tasks.append(asyncio.create_task(fire(i)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return records, time.perf_counter() - t0


def _plotter(config: BenchConfig) -> Any:
    """The plotting function when --plot is given, imported before any load so a missing
    matplotlib fails the run at once."""
    if not config.plot_dir:
        return None
    from tokenrelay._plots import write_plots  # raises ImportError with the install hint

    return write_plots


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def run_bench(config: BenchConfig, *, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr) -> BenchReport:
    """Run the whole sweep (blocking; starts its own event loop)."""
    return asyncio.run(LoadGenerator(config, out=out, err=err).run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenrelay-bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_bench(config_from_args(args))
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TokenRelayError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
