"""`tokenrelay bench`: a gRPC load generator for any tokenrelay server.

Closed loop (`--concurrency 1,4,16`: that many requests always in flight) or open loop
(`--rate 2,8`: seeded Poisson arrivals, requests/s), each point bounded by `--num-requests`
and/or `--duration`. Every request is a GenerateStream call, so token arrivals are timed on the
client: TTFT, inter-token latency (gaps between deltas that carry tokens), TPOT
((e2e - ttft) / (n - 1)), end-to-end latency, throughput and goodput under SLOs.

    python -m tokenrelay.loadgen --target localhost:50051 --concurrency 1,4 --num-requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from google.protobuf import json_format

from tokenrelay._aio import AsyncClient
from tokenrelay._cli_args import key_value
from tokenrelay._prompts import LengthRange, Prompt, load_prompt_file, random_token_prompts
from tokenrelay._report import ProgressBar, format_point, format_sweep
from tokenrelay._security import ChannelSecurity, add_security_arguments, security_from_args
from tokenrelay._stats import PointResult, RequestRecord, summarize_point
from tokenrelay.errors import TokenRelayError
from tokenrelay.v1 import generation_pb2

_GOOD_FINISH = frozenset({generation_pb2.FINISH_REASON_LENGTH, generation_pb2.FINISH_REASON_EOS,
                          generation_pb2.FINISH_REASON_STOP})
_PROMPT_POOL = 1024  # prompts generated for a duration-bounded point (reused round robin)


@dataclass(slots=True, frozen=True)
class BenchConfig:
    target: str
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    num_requests: int | None = None  # per point; None with a duration: as many as fit
    duration: float | None = None  # seconds per point (no new request starts after it)
    input_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    output_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    prompt_file: str | None = None
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    request_timeout: float = 120.0
    max_concurrency: int | None = None  # open loop: cap on requests in flight
    warmup: int = 1
    temperature: float | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    security: ChannelSecurity = field(default_factory=ChannelSecurity)  # TLS, mTLS, API key
    json_out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency and not self.rates:
            raise ValueError("give --concurrency and/or --rate")
        if any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency values must be >= 1")
        if any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise ValueError("rates must be > 0 requests/s")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give --num-requests and/or --duration so every point ends")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0 seconds")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0 seconds")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")


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
        async with AsyncClient(config.target, retries=0, metadata=config.metadata,
                               credentials=sec.credentials(), options=sec.options(), api_key=sec.api_key) as client:
            info = await client.info(timeout=config.request_timeout)
            self._check_lengths(info)
            file_prompts = load_prompt_file(config.prompt_file) if config.prompt_file else None
            report = BenchReport(config.target, json_format.MessageToDict(info, preserving_proto_field_name=True),
                                 _config_dict(config))
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
                    slo_ttft=_seconds(config.slo_ttft_ms), slo_tpot=_seconds(config.slo_tpot_ms))
                report.points.append(point)
                report.records.append(sorted(records, key=lambda r: r.start))
                print(format_point(point), file=self.out, flush=True)
            if len(report.points) > 1:
                print(format_sweep(report.points), file=self.out, flush=True)
        if config.json_out:
            with open(config.json_out, "w", encoding="utf-8") as handle:
                json.dump(report.to_dict(), handle, indent=2)
        return report

    def _check_lengths(self, info: Any) -> None:
        config = self.config
        longest = config.output_len.high + (0 if config.prompt_file else config.input_len.high)
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
            if stream.finish_reason not in _GOOD_FINISH:
                reason = stream.finish_reason
                error = (generation_pb2.FinishReason.Name(reason) if reason is not None
                         else "NO_FINISH_EVENT")
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
        arrival = 0.0
        try:
            for i in itertools.count():
                if config.num_requests is not None and i >= config.num_requests:
                    break
                arrival += rng.expovariate(rate)
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


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    data = asdict(config)
    data["input_len"] = str(config.input_len)
    data["output_len"] = str(config.output_len)
    data["metadata"] = [key for key, _ in config.metadata]  # values may be secrets
    sec = config.security
    data["security"] = {"tls": sec.uses_tls, "mtls": sec.client_cert is not None,
                        "api_key": sec.api_key is not None}  # never the key itself
    return data


def _csv(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, "
                                             f"got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def _length(text: str) -> LengthRange:
    try:
        return LengthRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("TOKENRELAY_TARGET", "localhost:50051"),
                        help="server host:port (default: env TOKENRELAY_TARGET, else localhost:50051)")
    parser.add_argument("--metadata", action="append", type=key_value, default=[],
                        metavar="KEY=VALUE", help="extra request metadata, repeatable")
    add_security_arguments(parser)
    parser.add_argument("--concurrency", type=_csv(int), default=(),
                        help="closed loop: comma-separated in-flight request counts, e.g. 1,4,16")
    parser.add_argument("--rate", type=_csv(float), default=(), dest="rates",
                        help="open loop: comma-separated Poisson arrival rates in requests/s")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per point (default 50 when no --duration)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per point; no request starts after it")
    parser.add_argument("--input-len", type=_length, default=LengthRange(128, 128),
                        help="prompt tokens: N or LOW:HIGH (random ids below the vocab size)")
    parser.add_argument("--output-len", type=_length, default=LengthRange(128, 128),
                        help="output tokens: N or LOW:HIGH (sent with ignore_eos, so exact)")
    parser.add_argument("--prompt-file", default=None,
                        help="prompts instead of random ids: one per line, or JSONL with "
                             "'prompt'/'text'/'token_ids'")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on TTFT")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on TPOT")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="deadline per request in seconds (default %(default)s)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="open loop: cap on requests in flight")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up requests before the sweep (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    parser.add_argument("--json-out", default=None, help="write every result as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    concurrency, rates = tuple(args.concurrency), tuple(args.rates)
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 50
    return BenchConfig(
        target=args.target, concurrency=concurrency or (() if rates else (1,)), rates=rates,
        num_requests=num_requests, duration=args.duration, input_len=args.input_len,
        output_len=args.output_len, prompt_file=args.prompt_file, seed=args.seed,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        request_timeout=args.request_timeout, max_concurrency=args.max_concurrency,
        warmup=args.warmup, temperature=args.temperature,
        metadata=tuple(getattr(args, "metadata", None) or ()), security=security_from_args(args),
        json_out=args.json_out,
        progress=not args.no_progress)


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
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TokenRelayError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
