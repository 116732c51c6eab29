"""Serving overhead of the gRPC front end, side by side in one run, as ratios.

    git archive <main-commit> | tar -x -C /tmp/before
    python bench/serving_overhead.py --tree before=/tmp/before --tree after=. --repeats 3
    python bench/serving_overhead.py --serve-args="--engine-process on"        # extra serve flags
    python bench/serving_overhead.py --tree a=/tmp/a --tree b=. --tree-args b="--no-uvloop"

Figures (each measured `--repeats` times, trees and the bare server interleaved, medians):
- stream: streaming tokens/s at 1 / 16 / 64 concurrent streams from a tokenrelay server on the
  synthetic engine (no delays) vs a bare grpc.aio server that sends the same stream (started, one
  delta per token, finished) with no engine behind it;
- unary: Generate RPC/s (16 in flight, 16 tokens each) vs the same bare server;
- demo: tiny-model (demo) output tokens/s through gRPC streams vs the same engine config driven
  offline in one process (no gRPC), at 16 and 64 streams;
- flood: demo tokens/s at 16 streams while another process floods the same server with cheap RPCs
  (health Check and Tokenize, 32 in flight) vs without the flood.

Every server and the offline engine run in their own processes built from the named tree (see
bench/trees.py); the load generator is this process. On a 2-core box the client shares the CPU
with the server: compare ratios measured in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc as tg_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trees import parse_trees, tree_env  # noqa: E402

STREAM_SHAPES = {1: (4, 512), 16: (1, 512), 64: (1, 256)}  # streams -> (requests per stream, tokens)
UNARY_IN_FLIGHT, UNARY_CALLS, UNARY_TOKENS = 16, 25, 16
DEMO_PROMPT, DEMO_TOKENS, DEMO_ROUNDS = "12+34=", 40, 3
FLOOD_IN_FLIGHT = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", help="name=path of a checkout (repeat); default: this one")
    p.add_argument("--serve-args", default="", help="extra flags for every tokenrelay server (and the offline "
                   "engine's config), e.g. '--engine-process on'")
    p.add_argument("--tree-args", action="append", default=[], help="name=flags: extra flags for one tree only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--demo-streams", default="16,64")
    p.add_argument("--skip", default="", help="comma-separated figures to skip: stream,unary,demo,flood")
    p.add_argument("--json-out", default="")
    p.add_argument("--role", choices=("bare", "offline", "flood"), help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the bare grpc.aio server: same messages, no engine ----------------------------------------

class _BareServicer(tg_grpc.TextGenerationServiceServicer):
    async def GenerateStream(self, request, context):
        n = request.params.stopping.max_tokens
        yield tg.GenerateStreamResponse(started=tg.StreamStarted(request_id="bare", prompt_tokens=4, seed=1))
        for i in range(n):
            yield tg.GenerateStreamResponse(delta=tg.StreamDelta(text=" word", token_ids=[300 + i % 30]))
        yield tg.GenerateStreamResponse(finished=tg.StreamFinished(finish_reason=gen.FINISH_REASON_LENGTH,
                                                                   usage=gen.Usage(prompt_tokens=4, completion_tokens=n)))

    async def Generate(self, request, context):
        n = request.params.stopping.max_tokens
        return tg.GenerateResponse(result=gen.GenerationResult(
            request_id="bare", text=" word" * n, token_ids=[300 + i % 30 for i in range(n)],
            finish_reason=gen.FINISH_REASON_LENGTH, usage=gen.Usage(prompt_tokens=4, completion_tokens=n)))


async def _bare_server() -> None:
    server = grpc.aio.server()
    tg_grpc.add_TextGenerationServiceServicer_to_server(_BareServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# ---- the offline engine: the demo workload without gRPC ----------------------------------------

async def _offline(serve_args: list[str], streams: list[int]) -> dict:
    from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria
    from tokenrelay_engines.torch.engine import TorchEngine
    from tokenrelay_server import main as server_main

    parser = argparse.ArgumentParser()
    server_main.add_serve_arguments(parser)
    # in-process, whatever the servers run: the engine with this process's cores to itself
    config = server_main.config_from_args(parser.parse_args(["--model", "demo", *serve_args,
                                                             "--engine-process", "off"]))
    engine = TorchEngine(config.torch)
    await engine.start()
    counter = iter(range(1 << 30))

    async def one() -> int:
        prompt = engine.tokenize(DEMO_PROMPT)
        req = Request(request_id=f"o{next(counter)}", prompt_token_ids=prompt, arrival_time=time.monotonic(),
                      sampling=SamplingParams(temperature=0.0),
                      stopping=StoppingCriteria(max_tokens=DEMO_TOKENS, ignore_eos=True))
        n = 0
        async for out in engine.add_request(req):
            n += len(out.token_ids)
        return n

    async def stream() -> int:
        return sum([await one() for _ in range(DEMO_ROUNDS)])

    out = {}
    try:
        await one()
        for c in streams:
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(stream() for _ in range(c))))
            out[str(c)] = tokens / (time.perf_counter() - start)
    finally:
        await engine.shutdown()
    return out


# ---- the flood: cheap RPCs as fast as they go ---------------------------------------------------

async def _flood(target: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    count = 0
    async with grpc.aio.insecure_channel(target) as ch:
        health, textgen = health_pb2_grpc.HealthStub(ch), tg_grpc.TextGenerationServiceStub(ch)

        async def worker(i: int) -> None:
            nonlocal count
            while not stop.is_set():
                if i % 2:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                else:
                    await textgen.Tokenize(tg.TokenizeRequest(text="1+1=2"), timeout=30)
                count += 1

        tasks = [asyncio.create_task(worker(i)) for i in range(FLOOD_IN_FLIGHT)]
        print("flooding", flush=True)
        await stop.wait()
        await asyncio.gather(*tasks)
    print(json.dumps({"rpcs": count}), flush=True)


# ---- the load generator (this process) ---------------------------------------------------------

def _params(tokens: int, text: str = "hello") -> gen.GenerationParams:
    return gen.GenerationParams(text=text, sampling=gen.SamplingParams(temperature=0.0),
                                stopping=gen.StoppingCriteria(max_tokens=tokens, ignore_eos=True))


async def _stream_tokens(stub, requests: int, tokens: int, text: str = "hello") -> tuple[int, int]:
    got = messages = 0
    for _ in range(requests):
        async for msg in stub.GenerateStream(tg.GenerateStreamRequest(params=_params(tokens, text)), timeout=300):
            if msg.HasField("delta"):
                got += len(msg.delta.token_ids)
                messages += 1
    return got, messages


async def stream_rate(target: str, streams: int, requests: int, tokens: int, text: str = "hello") -> dict:
    """Output tokens/s over `streams` concurrent streams, each running `requests` requests."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, streams // 16))]
    try:
        stubs = [tg_grpc.TextGenerationServiceStub(c) for c in channels]
        await _stream_tokens(stubs[0], 1, 8, text)  # warm connection
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream_tokens(stubs[i % len(stubs)], requests, tokens, text)
                                         for i in range(streams)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    got = sum(r[0] for r in results)
    return {"rate": got / elapsed, "tokens_per_message": got / max(1, sum(r[1] for r in results))}


async def unary_rate(target: str) -> dict:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = tg_grpc.TextGenerationServiceStub(ch)
        req = tg.GenerateRequest(params=_params(UNARY_TOKENS))
        await stub.Generate(req, timeout=60)

        async def caller() -> None:
            for _ in range(UNARY_CALLS):
                await stub.Generate(req, timeout=60)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(UNARY_IN_FLIGHT)))
        return {"rate": UNARY_IN_FLIGHT * UNARY_CALLS / (time.perf_counter() - start)}


class Process:
    """A child process that prints one ready line first."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: str, stdin=None) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd="/", stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if ready not in line:
            self.stop()
            raise RuntimeError(f"{argv[:4]} did not start: {line!r}")
        self.line = line.strip()
        self.address = self.line.rsplit(" ", 1)[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _server(tree: Path, flags: list[str]) -> Process:
    argv = [sys.executable, "-m", "tokenrelay_server.main", "--host", "127.0.0.1", "--port", "0",
            "--log-level", "WARNING", *flags]
    return Process(argv, tree_env(tree), "listening on")


async def flood_rate(tree: Path, target: str, streams: int) -> dict:
    flood = Process([sys.executable, __file__, "--role", "flood", "--target", target], tree_env(tree),
                    "flooding", stdin=subprocess.PIPE)
    try:
        result = await stream_rate(target, streams, DEMO_ROUNDS, DEMO_TOKENS, DEMO_PROMPT)
    finally:
        flood.proc.stdin.close()
        rpcs = json.loads(flood.proc.stdout.readline() or "{}").get("rpcs", 0)
        flood.stop()
    return {**result, "flood_rpcs": rpcs}


def offline_rates(tree: Path, serve_args: list[str], streams: list[int]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--role", "offline", "--demo-streams",
                           ",".join(map(str, streams)), f"--serve-args={shlex.join(serve_args)}"],
                          env=tree_env(tree), cwd="/", capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"offline engine failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def drive(args: argparse.Namespace) -> dict:
    trees = parse_trees(args.tree)
    per_tree = {name: shlex.split(args.serve_args) for name, _ in trees}
    for spec in args.tree_args:
        name, _, flags = spec.partition("=")
        per_tree[name] = per_tree.get(name, []) + shlex.split(flags)
    skip = set(filter(None, args.skip.split(",")))
    streams = [int(s) for s in args.streams.split(",") if s]
    demo_streams = [int(s) for s in args.demo_streams.split(",") if s]
    samples: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)
        print(f"  {key}: {value:,.1f}", file=sys.stderr, flush=True)

    procs: list[Process] = []
    try:
        bare = Process([sys.executable, __file__, "--role", "bare"], tree_env(trees[0][1]), "listening on")
        procs.append(bare)
        synthetic, demo = {}, {}
        for name, tree in trees:
            if not {"stream", "unary"} <= skip:
                synthetic[name] = _server(tree, ["--engine", "synthetic", "--synthetic-ttft-ms", "0",
                                                 "--synthetic-itl-ms", "0", "--max-num-seqs", "256",
                                                 *per_tree[name]])
                procs.append(synthetic[name])
            if not {"demo", "flood"} <= skip:
                demo[name] = _server(tree, ["--model", "demo", *per_tree[name]])
                procs.append(demo[name])
        for r in range(args.repeats):
            order = trees if r % 2 == 0 else trees[::-1]
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            if "stream" not in skip:
                for c in streams:
                    requests, tokens = STREAM_SHAPES.get(c, (1, 256))
                    targets = [("bare", bare.address)] + [(n, synthetic[n].address) for n, _ in order]
                    for name, address in (targets if r % 2 == 0 else targets[::-1]):
                        res = await stream_rate(address, c, requests, tokens)
                        record(f"stream/{c}/{name}", res["rate"])
                        record(f"stream/{c}/{name}/tokens_per_message", res["tokens_per_message"])
            if "unary" not in skip:
                targets = [("bare", bare.address)] + [(n, synthetic[n].address) for n, _ in order]
                for name, address in targets:
                    record(f"unary/{name}", (await unary_rate(address))["rate"])
            if "demo" not in skip:
                for name, tree in order:
                    for c, rate in offline_rates(tree, per_tree[name], demo_streams).items():
                        record(f"demo/{c}/{name}/offline", rate)
                    for c in demo_streams:
                        res = await stream_rate(demo[name].address, c, DEMO_ROUNDS, DEMO_TOKENS, DEMO_PROMPT)
                        record(f"demo/{c}/{name}/grpc", res["rate"])
            if "flood" not in skip:
                for name, tree in order:
                    res = await stream_rate(demo[name].address, 16, DEMO_ROUNDS, DEMO_TOKENS, DEMO_PROMPT)
                    record(f"flood/{name}/quiet", res["rate"])
                    res = await flood_rate(tree, demo[name].address, 16)
                    record(f"flood/{name}/flooded", res["rate"])
                    record(f"flood/{name}/flood_rpcs_per_s", res["flood_rpcs"] / max(1e-9, 16 * DEMO_ROUNDS
                                                                                    * DEMO_TOKENS / res["rate"]))
    finally:
        for p in reversed(procs):
            p.stop()
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {"medians": medians, "samples": samples, "trees": [n for n, _ in trees], "per_tree_args": per_tree}


def report(result: dict, args: argparse.Namespace) -> str:
    m, names = result["medians"], result["trees"]
    lines = [f"serving overhead, medians of {args.repeats} interleaved runs (ratios in brackets)"]

    def fmt(key: str, base: str | None) -> str:
        if key not in m:
            return "-"
        text = f"{m[key]:,.0f}"
        if base is not None and m.get(base):
            text += f" [{m[key] / m[base]:.2f}]"
        return text

    for c in [int(s) for s in args.streams.split(",") if s]:
        if f"stream/{c}/bare" in m:
            cells = [f"{n}={fmt(f'stream/{c}/{n}', f'stream/{c}/bare')} "
                     f"({m.get(f'stream/{c}/{n}/tokens_per_message', 0):.1f} tok/msg)" for n in names]
            lines.append(f"stream tok/s, {c:>2} streams: bare={fmt(f'stream/{c}/bare', None)}  " + "  ".join(cells))
    if "unary/bare" in m:
        lines.append("unary RPC/s: bare=" + fmt("unary/bare", None) + "  "
                     + "  ".join(f"{n}={fmt(f'unary/{n}', 'unary/bare')}" for n in names))
    for c in [int(s) for s in args.demo_streams.split(",") if s]:
        cells = [f"{n}: offline={fmt(f'demo/{c}/{n}/offline', None)} grpc={fmt(f'demo/{c}/{n}/grpc', f'demo/{c}/{n}/offline')}"
                 for n in names if f"demo/{c}/{n}/grpc" in m]
        if cells:
            lines.append(f"demo tok/s, {c:>2} streams: " + "  ".join(cells))
    cells = [f"{n}: quiet={fmt(f'flood/{n}/quiet', None)} flooded={fmt(f'flood/{n}/flooded', f'flood/{n}/quiet')} "
             f"({m.get(f'flood/{n}/flood_rpcs_per_s', 0):,.0f} flood RPC/s)" for n in names if f"flood/{n}/quiet" in m]
    if cells:
        lines.append("flood, demo tok/s at 16 streams: " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "bare":
        asyncio.run(_bare_server())
    elif args.role == "offline":
        result = asyncio.run(_offline(shlex.split(args.serve_args), [int(s) for s in args.demo_streams.split(",")]))
        print(json.dumps(result))
    elif args.role == "flood":
        asyncio.run(_flood(args.target))
    else:
        result = asyncio.run(drive(args))
        print(report(result, args))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
