"""The hardening figures, measured on a real server process built from any source tree.

    python bench/hardening.py                        # this checkout
    python bench/hardening.py --tree /tmp/old-main   # another checkout (same API), for before/after

Each figure is what an attacker or a careless client sees: the status of a non-ASCII request
id, the size of an error trailer, how late health answers while a big prompt is tokenized, how
many idle connections the server closes, how many deadline streams end twice, how many
server-chosen seeds a JavaScript number cannot hold, and how long SIGTERM takes to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc, text_generation_pb2_grpc
from tokenrelay.v1 import text_generation_pb2 as tg
from trees import server_module, tree_python

ROOT = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, tree: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([tree_python(tree), "-m", server_module(tree, "main"), "--host", "127.0.0.1",
                                      "--port", "0", *args], cwd=tree, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = line.strip().rsplit(" ", 1)[1]

    def stop(self) -> float:
        """SIGTERM; seconds until the process is gone."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return time.monotonic() - started


def supports(tree: Path, flag: str) -> bool:
    out = subprocess.run([tree_python(tree), "-m", server_module(tree, "main"), "--help"], cwd=tree,
                         capture_output=True, text=True, timeout=120).stdout
    return flag in out


async def error_figures(address: str) -> dict:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
        jobs = jobs_pb2_grpc.JobsServiceStub(ch)
        out = {}
        p = gen.GenerationParams(text="1+1=", request_id="é")
        out["request_id_non_ascii"] = await _code(stub.Generate(tg.GenerateRequest(params=p), timeout=10))
        p = gen.GenerationParams(text="1+1=", stopping=gen.StoppingCriteria(stop_token_ids=[10 ** 6 + i for i in range(100)]))
        out["100_bad_stop_token_ids"] = await _code(stub.Generate(tg.GenerateRequest(params=p), timeout=10))
        out["get_job_10k_id"] = await _code(jobs.GetJob(jobs_pb2.GetJobRequest(job_id="A" * 10000), timeout=10))
        seeds = [(await stub.Generate(tg.GenerateRequest(params=gen.GenerationParams(
            text="1+1=", stopping=gen.StoppingCriteria(max_tokens=1))), timeout=30)).result.seed for _ in range(20)]
        out["seeds_over_2^53"] = f"{sum(s >= 2 ** 53 for s in seeds)}/20"
        return out


async def _code(call) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        size = sum(len(k) + len(v) for k, v in exc.trailing_metadata() or ()) + len(exc.details() or "")
        return f"{exc.code().name} ({size} B)"


async def stall_figure(address: str, megabytes: float) -> dict:
    text = "123+456=" * int(megabytes * (1 << 20) / 8)
    async with grpc.aio.insecure_channel(address) as ch, grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]) as probe:
        health = health_pb2_grpc.HealthStub(probe)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        heavy = asyncio.ensure_future(_code(text_generation_pb2_grpc.TextGenerationServiceStub(ch).Tokenize(
            tg.TokenizeRequest(text=text), timeout=300)))
        worst, started = 0.0, time.monotonic()
        while not heavy.done():
            t = time.monotonic()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=300)
            worst = max(worst, time.monotonic() - t)
            await asyncio.sleep(0.01)
        return {f"tokenize_{megabytes:g}MiB": await heavy, "tokenize_wall_s": round(time.monotonic() - started, 2),
                "worst_health_s": round(worst, 3)}


async def idle_figure(address: str, connections: int, hold: float) -> dict:
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                            ("grpc.client_idle_timeout_ms", 3_600_000)])
                for _ in range(connections)]
    try:
        for i in range(0, connections, 100):
            await asyncio.gather(*(health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=60)
                                   for c in channels[i:i + 100]))
        await asyncio.sleep(hold)  # the measurement: what the server does with idle connections
        closed = sum(c.get_state() != grpc.ChannelConnectivity.READY for c in channels)
        return {f"idle_{connections}_closed_after_{hold:g}s": closed}
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def double_end_figure(address: str, streams: int) -> dict:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)

        async def one(i: int) -> bool:
            call = stub.GenerateStream(tg.GenerateStreamRequest(params=gen.GenerationParams(
                text=f"{i}+1=", stopping=gen.StoppingCriteria(max_tokens=500, ignore_eos=True))),
                timeout=0.02 + (i % 10) * 0.01)
            finished = False
            try:
                async for event in call:
                    finished = finished or event.WhichOneof("event") == "finished"
            except grpc.aio.AioRpcError:
                return finished  # a `finished` event and then an error status: two ends
            return False

        twice = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        return {"deadline_streams_ending_twice": f"{twice}/{streams}"}


async def measure(tree: Path, args: argparse.Namespace) -> dict:
    engine = ["--engine", "synthetic", "--synthetic-itl-ms", "2", "--synthetic-ttft-ms", "1"]
    idle = ["--max-connection-idle-seconds", "2"] if supports(tree, "--max-connection-idle-seconds") else []
    figures: dict = {"tree": str(tree)}
    server = Server(tree, *engine, *idle)
    try:
        figures.update(await error_figures(server.address))
        figures.update(await double_end_figure(server.address, args.streams))
        figures.update(await idle_figure(server.address, args.connections, args.hold))
    finally:
        figures["sigterm_exit_s_synthetic"] = round(server.stop(), 2)
    server = Server(tree)  # the reference engine: real tokenizer
    try:
        figures.update(await stall_figure(server.address, args.prompt_mib))
    finally:
        figures["sigterm_exit_s_torch"] = round(server.stop(), 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append", help="source tree(s); default: this checkout")
    parser.add_argument("--prompt-mib", type=float, default=1.0, help="Tokenize text size for the stall figure")
    parser.add_argument("--connections", type=int, default=1000, help="idle connections to hold")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to hold them")
    parser.add_argument("--streams", type=int, default=1000, help="deadline streams")
    args = parser.parse_args()
    for tree in args.tree or [ROOT]:
        print(json.dumps(asyncio.run(measure(tree.resolve(), args))), flush=True)


if __name__ == "__main__":
    main()
