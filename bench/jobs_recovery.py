"""Durable jobs under faults, for one or two source trees side by side (interleaved, repeated,
medians): how long a dead replica's running jobs take to finish, how long jobs take after a
Redis outage, and what the stores write per persisted delta of a job with a big params document.

    python bench/jobs_recovery.py --tree /path/to/old/checkout --tree . --repeat 3

Each tree's servers run as `-m tokenrelay_server.main` processes under that tree's Python
(bench/trees.py); the store measurement runs in a child process under it too, and imports
`tokenrelay_server`, so it needs a tree from after the package rename. Needs redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

from trees import server_module, tree_python  # noqa: E402

LEASE = 3.0


def _server(tree: Path) -> dict[str, str]:
    """spawn_replica's keywords that run `tree`'s server."""
    return {"python": tree_python(tree), "module": server_module(tree, "main")}


async def dead_replica(tree: Path, work: Path) -> dict:
    """8 jobs claimed at once by replica a (slow engine); replica b (default poll) takes over
    after a is SIGKILLed. Seconds from the kill until all 8 ended."""
    from tests.jobs.procs import RedisProcess, spawn_replica, wait_all_ended, wait_running_with_tokens

    redis = RedisProcess(work / "redis")
    await redis.start()
    replicas = []
    try:
        ids = json.loads(subprocess.run(
            [tree_python(tree), str(HERE), "--queue", redis.url, "--n", "8", "--max-tokens", "600"],
            check=True, capture_output=True, text=True).stdout)
        common = ("--jobs-max-running", "8", "--jobs-lease-seconds", str(LEASE))
        a = await spawn_replica(redis.url, work / "a", "--replica-id", "a", *common, itl_ms=25.0, **_server(tree))
        replicas.append(a)
        await wait_running_with_tokens(a.stub, ids, 60)
        b = await spawn_replica(redis.url, work / "b", "--replica-id", "b", *common, "--jobs-poll-seconds", "0.5",
                                itl_ms=1.0, **_server(tree))
        replicas.append(b)
        await a.kill()
        t0 = time.monotonic()
        await wait_all_ended(b.stub, ids, 600)
        return {"seconds": time.monotonic() - t0}
    finally:
        for r in replicas:
            await r.close()
        await redis.kill()


async def outage(tree: Path, work: Path) -> dict:
    """16 jobs on two replicas; redis-server SIGKILLed mid-run for 5 s, restarted on its AOF.
    Seconds from the restart until all 16 ended, and the status codes seen during the outage."""
    import grpc
    from tokenrelay.v1 import jobs_pb2

    from tests.jobs.helpers import submit_request
    from tests.jobs.procs import RedisProcess, spawn_replica, wait_all_ended, wait_running_with_tokens

    redis = RedisProcess(work / "redis")
    await redis.start()
    replicas = []
    try:
        for name in ("a", "b"):
            replicas.append(await spawn_replica(redis.url, work / name, "--replica-id", name, "--jobs-max-running",
                                                "8", "--jobs-lease-seconds", str(LEASE), itl_ms=10.0,
                                                **_server(tree)))
        a, b = replicas
        ids = [(await (a if i % 2 else b).stub.SubmitJob(submit_request(300, prompt=f"doc {i}"))).job.job_id
               for i in range(16)]
        await wait_running_with_tokens(a.stub, ids[:4], 60)
        await redis.kill()
        codes: dict[str, int] = {}
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            for r in replicas:
                for call in (r.stub.SubmitJob(submit_request(3), timeout=2),
                             r.stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=2)):
                    try:
                        await call
                        code = "OK"
                    except grpc.aio.AioRpcError as err:
                        code = err.code().name
                    codes[code] = codes.get(code, 0) + 1
            await asyncio.sleep(0.1)  # probe pacing
        await redis.start()
        t0 = time.monotonic()
        deadline = time.monotonic() + 600
        while True:  # an old server may answer UNAVAILABLE/INTERNAL right after the restart: retry
            try:
                await wait_all_ended(a.stub, ids, max(1.0, deadline - time.monotonic()))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        return {"seconds": time.monotonic() - t0, "codes": codes}
    finally:
        for r in replicas:
            await r.close()
        await redis.kill()


def _bytes_written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


async def store_writes(redis_url: str, params_bytes: int, n: int) -> dict:
    """In this process, with the tree on sys.path: per delta of a job whose params document
    is `params_bytes` long, bytes handed to write(2) by SQLite, its file growth (db + WAL), and
    bytes Redis received."""
    from tokenrelay_server.jobs.model import Delta
    from tokenrelay_server.jobs.redis_store import RedisJobStore
    from tokenrelay_server.jobs.sqlite_store import SqliteJobStore
    from tests.jobs.helpers import make_job

    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "jobs.db"
        for kind in ("sqlite", "redis"):
            store = SqliteJobStore(str(path)) if kind == "sqlite" else RedisJobStore(redis_url, prefix=f"b{n}")
            await store.open()
            job = make_job()
            job.params = os.urandom(params_bytes)
            await store.create(job)
            claimed = await store.claim("r", 300.0, 1000.0)
            assert claimed is not None
            size0 = sum(p.stat().st_size for p in Path(d).glob("jobs.db*"))
            w0 = _bytes_written() if kind == "sqlite" else int((await store.r.info("stats"))["total_net_input_bytes"])
            for i in range(n):
                assert await store.append_output(job.job_id, "r", Delta(i, (i,), "x", i), 1000.0 + i)
            w1 = _bytes_written() if kind == "sqlite" else int((await store.r.info("stats"))["total_net_input_bytes"])
            out[f"{kind}_bytes_per_delta"] = (w1 - w0) / n
            if kind == "sqlite":
                out["sqlite_file_growth_bytes"] = sum(p.stat().st_size for p in Path(d).glob("jobs.db*")) - size0
            await store.close()
    return out


async def measure_stores(tree: Path, work: Path, params_bytes: int, n: int) -> dict:
    from tests.jobs.procs import RedisProcess

    redis = RedisProcess(work / "redis")
    await redis.start()
    try:
        res = subprocess.run([tree_python(tree), str(HERE), "--store-writes", redis.url, "--params-bytes",
                              str(params_bytes), "--n", str(n)], check=True, capture_output=True, text=True)
        return json.loads(res.stdout)
    finally:
        await redis.kill()


async def main(args: argparse.Namespace) -> None:
    trees = [Path(t).resolve() for t in args.tree]
    results: dict[str, dict[str, list]] = {str(t): {} for t in trees}
    for rep in range(args.repeat):
        for tree in trees:  # interleaved
            with tempfile.TemporaryDirectory() as d:
                work = Path(d)
                r = results[str(tree)]
                r.setdefault("dead_replica_s", []).append((await dead_replica(tree, work / "dead"))["seconds"])
                o = await outage(tree, work / "outage")
                r.setdefault("outage_s", []).append(o["seconds"])
                r.setdefault("outage_codes", []).append(o["codes"])
                s = await measure_stores(tree, work / "stores", args.params_bytes, args.deltas)
                for k, v in s.items():
                    r.setdefault(k, []).append(v)
            print(f"rep {rep} {tree}: " + ", ".join(f"{k}={v[-1]}" for k, v in results[str(tree)].items()),
                  flush=True)
    print("\nmedians (lease %.0fs, params %d bytes, %d deltas):" % (LEASE, args.params_bytes, args.deltas))
    for tree, r in results.items():
        med = {k: round(statistics.median(v), 1) for k, v in r.items() if k != "outage_codes"}
        print(f"  {tree}: {med}; outage codes {r['outage_codes']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="a source tree to measure (repeatable)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--params-bytes", type=int, default=100_000)
    p.add_argument("--deltas", type=int, default=200)
    p.add_argument("--store-writes", default="", help=argparse.SUPPRESS)  # child: measure in-process
    p.add_argument("--queue", default="", help=argparse.SUPPRESS)  # child: queue jobs in the store
    p.add_argument("--n", type=int, default=200, help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=600, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.store_writes:
        print(json.dumps(asyncio.run(store_writes(a.store_writes, a.params_bytes, a.n))))
    elif a.queue:
        from tests.jobs.procs import queue_jobs
        print(json.dumps(asyncio.run(queue_jobs(a.queue, a.n, a.max_tokens))))
    else:
        asyncio.run(main(a))
