"""The load generator's configuration: one typed BenchConfig, built once from its flags."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenrelay._prompts import DATASETS, LengthRange
from tokenrelay._security import ChannelSecurity, add_security_arguments, security_from_args
from tokenrelay._stats import PERCENTILES, parse_percentiles
from tokenrelay.cli._args import DEFAULT_TARGET, key_value


@dataclass(slots=True, frozen=True)
class BenchConfig:
    target: str
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    num_requests: int | None = None  # per point; None with a duration: as many as fit
    duration: float | None = None  # seconds per point (no new request starts after it)
    input_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    output_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    prompt_file: str | None = None  # the dataset's file (--dataset-path)
    dataset_name: str = ""  # random | file | sharegpt; "" = file when prompt_file is set, else random
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    request_timeout: float = 120.0
    max_concurrency: int | None = None  # open loop: cap on requests in flight
    burstiness: float = 1.0  # open loop: gamma shape of the inter-arrival times (1 = Poisson)
    percentiles: tuple[float, ...] = tuple(float(q) for q in PERCENTILES)
    warmup: int = 1
    temperature: float | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    security: ChannelSecurity = field(default_factory=ChannelSecurity)  # TLS, mTLS, API key
    json_out: str | None = None
    plot_dir: str | None = None
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
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("burstiness must be > 0 (1 is Poisson; lower is burstier)")
        if not self.percentiles or any(not 0 <= q <= 100 for q in self.percentiles):
            raise ValueError("percentiles must be in [0, 100]")
        if not self.dataset_name:
            object.__setattr__(self, "dataset_name", "file" if self.prompt_file else "random")
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name must be one of {', '.join(DATASETS)}")
        if (self.dataset_name != "random") != (self.prompt_file is not None):
            raise ValueError(f"the {self.dataset_name} dataset "
                             + ("needs --dataset-path" if self.prompt_file is None else "takes no --dataset-path"))

    def to_dict(self) -> dict[str, Any]:
        """For reports: lengths as text, metadata keys only and no API key (values may be secrets)."""
        data = asdict(self)
        data["input_len"] = str(self.input_len)
        data["output_len"] = str(self.output_len)
        data["metadata"] = [key for key, _ in self.metadata]
        sec = self.security
        data["security"] = {"tls": sec.uses_tls, "mtls": sec.client_cert is not None,
                            "api_key": sec.api_key is not None}
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


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return parse_percentiles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("TOKENRELAY_TARGET") or DEFAULT_TARGET,
                        help=f"server host:port (default: env TOKENRELAY_TARGET, else {DEFAULT_TARGET})")
    parser.add_argument("--metadata", action="append", type=key_value, default=[],
                        metavar="KEY=VALUE", help="extra request metadata, repeatable")
    add_security_arguments(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_csv(int), default=(),
                      help="closed loop: comma-separated in-flight request counts, e.g. 1,4,16")
    load.add_argument("--rate", type=_csv(float), default=(), dest="rates",
                      help="open loop: comma-separated arrival rates in requests/s")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="open loop: inter-arrival times are gamma distributed with this shape "
                           "and the rate's mean; 1 is Poisson, < 1 burstier, > 1 more uniform "
                           "(default %(default)s)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="open loop: cap on requests in flight")
    load.add_argument("--num-requests", type=int, default=None,
                      help="requests per point (default 50 when no --duration)")
    load.add_argument("--duration", type=float, default=None,
                      help="seconds per point; no request starts after it")
    load.add_argument("--warmup", type=int, default=1,
                      help="untimed warm-up requests before the sweep (default %(default)s)")
    load.add_argument("--request-timeout", type=float, default=120.0,
                      help="deadline per request in seconds (default %(default)s)")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="",
                      help="random: random token ids of --input-len; file: one prompt per line, or "
                           "JSONL with 'prompt'/'text'/'token_ids'; sharegpt: a ShareGPT JSON file "
                           "(first human turn of each conversation). Default: file with "
                           "--dataset-path, else random")
    data.add_argument("--dataset-path", "--prompt-file", dest="prompt_file", default=None,
                      help="the dataset's file (file, sharegpt)")
    data.add_argument("--input-len", type=_length, default=LengthRange(128, 128),
                      help="random dataset: prompt tokens, N or LOW:HIGH (ids below the vocab size)")
    data.add_argument("--output-len", type=_length, default=LengthRange(128, 128),
                      help="output tokens: N or LOW:HIGH (sent with ignore_eos, so exact)")
    data.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals")
    data.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    report = parser.add_argument_group("report")
    report.add_argument("--percentiles", "--metric-percentiles", type=_percentiles,
                        default=tuple(float(q) for q in PERCENTILES),
                        help="latency percentiles to report, e.g. 50,90,99 (default 50,90,95,99)")
    report.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on TTFT")
    report.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on TPOT")
    report.add_argument("--json-out", default=None, help="write every result as JSON here")
    report.add_argument("--plot", dest="plot_dir", default=None, metavar="DIR",
                        help="write PNG plots here: TTFT / ITL / E2E distributions and throughput "
                             "and goodput against concurrency or rate (needs matplotlib: pip "
                             "install 'tokenrelay-client[plot]')")
    report.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    concurrency, rates = tuple(args.concurrency), tuple(args.rates)
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 50
    return BenchConfig(
        target=args.target, concurrency=concurrency or (() if rates else (1,)), rates=rates,
        num_requests=num_requests, duration=args.duration, input_len=args.input_len,
        output_len=args.output_len, prompt_file=args.prompt_file, dataset_name=args.dataset_name,
        seed=args.seed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        request_timeout=args.request_timeout, max_concurrency=args.max_concurrency,
        burstiness=args.burstiness, percentiles=tuple(args.percentiles),
        warmup=args.warmup, temperature=args.temperature,
        metadata=tuple(getattr(args, "metadata", None) or ()), security=security_from_args(args),
        json_out=args.json_out, plot_dir=args.plot_dir, progress=not args.no_progress)
