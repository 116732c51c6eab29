"""The engine core in its own process vs on a thread of the server, side by side.

    python bench/engine_process.py [--streams 16] [--max-tokens 128] [--rounds 3] [--flood 4]

For each mode (`--engine-process on` / `off`) a real server (tiny dummy model, CPU) is started;
`--streams` concurrent greedy GenerateStream calls of `--max-tokens` tokens are timed (output
tokens/s), alone and again while `--flood` client processes send cheap GetServerLoad RPCs to the
same server as fast as they can. Modes and conditions are interleaved over `--rounds`; medians
and ratios are printed. Numbers are for this box only: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc


def start_server(mode: str, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay_server.main", "--engine", "torch", "--engine-process", mode,
         "--load-format", "dummy", "--dummy-shape", "tiny", "--device", "cpu", "--num-threads", str(threads),
         "--num-kv-blocks", "4096", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
         "--jobs-store", "sqlite:///tmp/tokenrelay-bench-engine-process.sqlite", "--max-num-seqs", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("tokenrelay listening on "):
            return proc, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("server exited before listening")


def _flood(address: str, stop: mp.Event) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
            while not stop.is_set():
                await asyncio.gather(*(stub.GetServerLoad(tg.GetServerLoadRequest()) for _ in range(16)))
    asyncio.run(run())


async def streams(address: str, n: int, max_tokens: int) -> float:
    params = gen.GenerationParams(text="hello world", sampling=gen.SamplingParams(temperature=0.0),
                                  stopping=gen.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)

        async def one() -> int:
            count = 0
            async for ev in stub.GenerateStream(tg.GenerateStreamRequest(params=params)):
                if ev.WhichOneof("event") == "delta":
                    count += len(ev.delta.token_ids)
            return count
        await one()  # warm
        started = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(n))))
        return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=4, help="client processes sending GetServerLoad")
    parser.add_argument("--threads", type=int, default=1, help="--num-threads of the engine")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    servers = {mode: start_server(mode, args.threads) for mode in ("on", "off")}
    ctx = mp.get_context("spawn")
    try:
        for _ in range(args.rounds):
            for mode, (_, address) in servers.items():
                for cond in ("alone", "flood"):
                    stop = ctx.Event()
                    flooders = [ctx.Process(target=_flood, args=(address, stop)) for _ in range(args.flood)] \
                        if cond == "flood" else []
                    for f in flooders:
                        f.start()
                    rate = asyncio.run(streams(address, args.streams, args.max_tokens))
                    stop.set()
                    for f in flooders:
                        f.join(30)
                    results.setdefault((mode, cond), []).append(rate)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.streams} streams x {args.max_tokens} tokens, tiny dummy model, {args.rounds} rounds, "
          f"flood = {args.flood} processes of GetServerLoad; cpus={os.cpu_count()}")
    for mode in ("on", "off"):
        alone, flood = med[(mode, "alone")], med[(mode, "flood")]
        print(f"  --engine-process {mode:3s}: alone {alone:8.1f} tok/s  flood {flood:8.1f} tok/s  "
              f"flood/alone {flood / alone:.2f}")
    print(f"  on/off alone {med[('on', 'alone')] / med[('off', 'alone')]:.2f}  "
          f"on/off under flood {med[('on', 'flood')] / med[('off', 'flood')]:.2f}")


if __name__ == "__main__":
    main()
