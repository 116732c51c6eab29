"""Interactive time-to-first-token alone vs next to bulk jobs, on one tokenrelay server.

Starts `python -m tokenrelay_server.main` (synthetic engine with a limited batch by default, or the torch
demo engine with `--engine torch`) on a fresh SQLite job store, then:

  1. interactive only: `--clients` concurrent GenerateStream loops for `--duration` seconds;
  2. mixed: `--jobs` bulk jobs submitted first (they fill what the engine has left), then the
     same interactive load again; afterwards it waits (bounded) for the jobs to complete.

Prints one JSON object: TTFT p50 / p95 both ways, their ratios (mixed / alone), and how many
jobs completed during the mixed phase and in total.

    python bench/jobs_mix.py --clients 8 --duration 5 --jobs 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from tokenrelay.v1 import generation_pb2, jobs_pb2, jobs_pb2_grpc, text_generation_pb2, text_generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DONE = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED, jobs_pb2.JOB_STATE_DEAD_LETTER}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def start_server(args: argparse.Namespace, workdir: str) -> tuple[asyncio.subprocess.Process, str]:
    cmd = [sys.executable, "-m", "tokenrelay_server.main", "--engine", args.engine, "--host", "127.0.0.1", "--port", "0",
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "WARNING",
           "--jobs-store", f"sqlite://{workdir}/jobs.db", "--jobs-max-running", str(args.jobs_max_running),
           "--max-pending-requests", "4096"]
    if args.engine == "torch":
        cmd += ["--model", "demo"]
    if args.engine == "synthetic":
        cmd += ["--synthetic-ttft-ms", str(args.ttft_ms), "--synthetic-itl-ms", str(args.itl_ms)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=workdir, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode()
        if not line:
            raise RuntimeError("the server exited before listening")
        if line.startswith("tokenrelay listening on "):
            return proc, line.rsplit(" ", 1)[1].strip()


def params(tokens: int, prompt: str) -> generation_pb2.GenerationParams:
    return generation_pb2.GenerationParams(
        text=prompt, stopping=generation_pb2.StoppingCriteria(max_tokens=tokens, ignore_eos=True))


async def interactive(stub: text_generation_pb2_grpc.TextGenerationServiceStub, args: argparse.Namespace) -> list[float]:
    """`clients` closed-loop streams for `duration` seconds; the TTFT of each, in ms."""
    ttfts: list[float] = []
    end = time.monotonic() + args.duration

    async def client(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            start = time.monotonic()
            first = None
            req = text_generation_pb2.GenerateStreamRequest(params=params(args.stream_tokens, f"user {i} turn {n}"))
            async for ev in stub.GenerateStream(req, timeout=120):
                if first is None and ev.HasField("delta") and ev.delta.token_ids:
                    first = time.monotonic()
            if first is not None:
                ttfts.append((first - start) * 1000)
            n += 1

    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return ttfts


async def count_done(stub: jobs_pb2_grpc.JobsServiceStub) -> int:
    done, token = 0, ""
    while True:
        page = await stub.ListJobs(jobs_pb2.ListJobsRequest(states=[jobs_pb2.JOB_STATE_SUCCEEDED], page_size=1000,
                                                            page_token=token))
        done += len(page.jobs)
        token = page.next_page_token
        if not token:
            return done


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        proc, address = await start_server(args, workdir)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                gen = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
                jobs = jobs_pb2_grpc.JobsServiceStub(channel)
                alone = await interactive(gen, args)
                ids = []
                for i in range(args.jobs):
                    resp = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(
                        params=params(args.job_tokens, f"document {i}"), priority=jobs_pb2.JOB_PRIORITY_BULK))
                    ids.append(resp.job.job_id)
                mix_start = time.monotonic()
                mixed = await interactive(gen, args)
                done_during = await count_done(jobs)
                deadline = time.monotonic() + args.drain_timeout
                done_total = done_during
                while done_total < len(ids) and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)  # progress polling for the report, not synchronisation
                    done_total = await count_done(jobs)
                drained_s = time.monotonic() - mix_start
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    out = {
        "config": {k: v for k, v in vars(args).items()},
        "interactive_only": {"requests": len(alone), "ttft_p50_ms": round(percentile(alone, 50), 2),
                             "ttft_p95_ms": round(percentile(alone, 95), 2),
                             "ttft_mean_ms": round(statistics.fmean(alone), 2) if alone else None},
        "interactive_with_jobs": {"requests": len(mixed), "ttft_p50_ms": round(percentile(mixed, 50), 2),
                                  "ttft_p95_ms": round(percentile(mixed, 95), 2),
                                  "ttft_mean_ms": round(statistics.fmean(mixed), 2) if mixed else None},
        "jobs_submitted": len(ids),
        "jobs_completed_during_mix": done_during,
        "jobs_completed_total": done_total,
        "jobs_elapsed_s": round(drained_s, 2),
    }
    out["ttft_p50_ratio"] = round(percentile(mixed, 50) / percentile(alone, 50), 3) if alone and mixed else None
    out["ttft_p95_ratio"] = round(percentile(mixed, 95) / percentile(alone, 95), 3) if alone and mixed else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("synthetic", "torch"), default="synthetic")
    p.add_argument("--clients", type=int, default=8, help="concurrent interactive streams")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of interactive load per phase")
    p.add_argument("--stream-tokens", type=int, default=32)
    p.add_argument("--jobs", type=int, default=100, help="bulk jobs submitted before the mixed phase")
    p.add_argument("--job-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine batch size")
    p.add_argument("--jobs-max-running", type=int, default=8, help="jobs in the engine at once")
    p.add_argument("--ttft-ms", type=float, default=10.0, help="synthetic engine")
    p.add_argument("--itl-ms", type=float, default=5.0, help="synthetic engine")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the jobs afterwards")
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
