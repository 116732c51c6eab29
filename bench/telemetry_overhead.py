"""Throughput cost of telemetry: `tokenrelay bench` against synthetic-engine servers with
metrics and tracing on vs off, side by side in one run (interleaved rounds, medians).

    python bench/telemetry_overhead.py --rounds 5 --concurrency 32 --num-requests 300

Three servers run at once, each in its own process; every round benches each of them in turn
(order rotated per round), one at a time, with the same workload:

- bare:    --no-access-log, no metrics, no tracing (nothing of the telemetry installed)
- default: the access log only (the default configuration)
- full:    access log + Prometheus metrics + OpenTelemetry tracing (every call sampled and
           exported over OTLP/gRPC to a receiver in this script)
- sampled: as full, with --trace-sample-ratio 0.1 (one new trace in ten recorded)

Reported per arm: median output tokens/s, and the server process's CPU time per 1000 output
tokens (from /proc: all its threads, span export included), which is much steadier than
throughput on a shared machine; then the ratios full/default (what metrics and tracing cost)
and default/bare (what the access log costs), as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def _start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--engine", "synthetic", "--host", "127.0.0.1",
           "--port", "0", *flags]  # INFO: access lines are written (to /dev/null)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("tokenrelay listening on "):
            return proc, "127.0.0.1:" + line.split()[-1].rsplit(":", 1)[1]
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bench(target: str, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(output tokens/s, output tokens) of one run."""
    cmd = [sys.executable, "-m", "tokenrelay_server.cli", "bench", "--target", target, "--concurrency", str(args.concurrency),
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--warmup", "8", "--no-progress", "--json-out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=600)
    point = json.loads(out.read_text())["points"][0]
    if point["failed"]:
        raise RuntimeError(f"{point['failed']} requests failed: {point['errors']}")
    return float(point["output_throughput"]), float(point["output_throughput"]) * float(point["duration_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--itl-ms", type=float, default=1.0, help="synthetic engine: ms per token")
    args = parser.parse_args()

    receiver = _Receiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()

    engine = ["--synthetic-ttft-ms", "0", "--synthetic-itl-ms", str(args.itl_ms), "--max-num-seqs", "256",
              "--max-pending-requests", "4096"]
    arms = {
        "bare": [*engine, "--no-access-log"],
        "default": [*engine],
        "full": [*engine, "--metrics-port", "0", "--otlp-traces-endpoint", f"http://127.0.0.1:{otlp_port}"],
        "sampled": [*engine, "--metrics-port", "0", "--otlp-traces-endpoint", f"http://127.0.0.1:{otlp_port}",
                    "--trace-sample-ratio", "0.1"],
    }
    servers = {name: _start_server(flags) for name, flags in arms.items()}
    results: dict[str, list[float]] = {name: [] for name in arms}
    cpu_per_k: dict[str, list[float]] = {name: [] for name in arms}  # server CPU seconds / 1000 tokens
    names = list(arms)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    proc, target = servers[name]
                    cpu0 = _cpu_seconds(proc.pid)
                    rate, tokens = _bench(target, args, Path(tmp) / f"{name}-{r}.json")
                    results[name].append(rate)
                    cpu_per_k[name].append((_cpu_seconds(proc.pid) - cpu0) / tokens * 1000)
                print(f"round {r + 1}: " + "  ".join(
                    f"{n} {results[n][-1]:.0f} tok/s {cpu_per_k[n][-1] * 1000:.0f} ms-cpu/ktok" for n in names),
                    flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(timeout=60)
        otlp.stop(0)
    med = {n: statistics.median(v) for n, v in results.items()}
    cpu = {n: statistics.median(v) for n, v in cpu_per_k.items()}
    print(f"\nmedians over {args.rounds} rounds (concurrency {args.concurrency}, {args.num_requests} requests "
          f"x {args.output_len} tokens, synthetic itl {args.itl_ms} ms):")
    print(f"  {'arm':8s} {'tok/s':>10s} {'server ms-cpu per 1000 tokens':>32s}")
    for n in names:
        print(f"  {n:8s} {med[n]:10.0f} {cpu[n] * 1000:32.1f}")

    def ratio(values: dict[str, list[float]], a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(values[a], values[b]))

    for a, b, what in (("full", "default", "metrics + tracing"),
                       ("sampled", "default", "metrics + tracing sampled 10 %"),
                       ("default", "bare", "access log"), ("full", "bare", "all telemetry")):
        print(f"{a}/{b} ({what}): throughput {ratio(results, a, b):.3f}, "
              f"server CPU per token {ratio(cpu_per_k, a, b):.3f}")
    print(f"spans received by the OTLP receiver: {receiver.spans}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
