"""The Redis job queue: one stream per priority tier, read through one consumer group.

A queue entry is named `{tier}|{stream entry id}`. New entries are read with XREADGROUP;
entries whose consumer stopped touching them for a whole lease (its replica died) are taken
over with XAUTOCLAIM; the owner touches its entry on every heartbeat (XCLAIM to itself, which
resets the idle time); an entry is XACKed and deleted once its job is done with it. The job
state itself lives in the store's hashes: this class only knows entries and job ids.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rx

from tokenrelay_server.jobs.model import TIERS_IN_CLAIM_ORDER, JobTier
from tokenrelay_server.jobs.store import StoreUnavailable

GROUP = "workers"
_BATCH = 16  # new entries read per tier and claim, at most
_SCAN_CALLS = 16  # XAUTOCLAIM calls per tier and claim, at most (each looks at up to 10 entries)
T = TypeVar("T")
# Redis cannot serve now but may soon: down, restarting (LOADING), a replica, failing over
_UNAVAILABLE = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.MasterDownError, rx.TryAgainError,
                rx.ClusterDownError, OSError)


def redis_call(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Around every store method that talks to Redis:

    - an outage (connection refused or lost, timeout, LOADING, read-only replica) raises
      StoreUnavailable, which callers retry and the API answers UNAVAILABLE;
    - redis-py may turn a task cancellation into a connection error and retry the command: a
      cancelled task then carries on, so CancelledError is re-raised once the call returns or fails.
    """
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            if _cancelling():
                raise asyncio.CancelledError from None
            if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, StoreUnavailable):
                raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
            raise
        if _cancelling():
            raise asyncio.CancelledError
        return result
    return wrapper


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RedisQueue:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._cursors: dict[JobTier, str] = {}  # where the XAUTOCLAIM scan of each tier goes on

    def stream(self, tier: JobTier) -> str:
        return f"{self._prefix}:queue:{tier.value}"

    async def create_groups(self, r: aioredis.Redis) -> None:
        for tier in TIERS_IN_CLAIM_ORDER:
            try:
                await r.xgroup_create(self.stream(tier), GROUP, id="0", mkstream=True)
            except rx.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- staged inside the store's MULTI transactions ---------------------------------------
    def stage_push(self, pipe: Any, tier: JobTier, job_id: str) -> None:
        pipe.xadd(self.stream(tier), {"job": job_id})

    def stage_ack(self, pipe: Any, entry: str) -> None:
        tier, _, entry_id = entry.partition("|")
        stream = self.stream(JobTier(tier))
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)

    def stage_touch(self, pipe: Any, entry: str, consumer: str) -> None:
        """Reset the entry's idle time: the heartbeat that keeps XAUTOCLAIM away."""
        tier, _, entry_id = entry.partition("|")
        pipe.xclaim(self.stream(JobTier(tier)), GROUP, consumer, 0, [entry_id], justid=True)

    async def ack(self, r: aioredis.Redis, entry: str) -> None:
        async with r.pipeline(transaction=True) as pipe:
            self.stage_ack(pipe, entry)
            await pipe.execute()

    # -- reading ----------------------------------------------------------------------------
    async def candidates(self, r: aioredis.Redis, consumer: str,
                         lease: float) -> AsyncIterator[tuple[str, str | None]]:
        """(entry, job id) to try, urgent tier first: per tier, entries of dead consumers, then
        new ones. Every entry yielded is now pending on `consumer`.

        Stuck entries are taken one at a time (XAUTOCLAIM COUNT 1): the caller starts each one
        it takes, so nothing is parked on this consumer (and hidden from the others for another
        lease) while it cannot run it. The scan goes on from where the last one stopped."""
        for tier in TIERS_IN_CLAIM_ORDER:
            stream = self.stream(tier)
            for _ in range(_SCAN_CALLS):
                cursor = self._cursors.get(tier, "0-0")
                res = await r.xautoclaim(stream, GROUP, consumer, min_idle_time=int(lease * 1000),
                                         start_id=cursor, count=1)
                self._cursors[tier] = res[0]
                for entry_id, fields in res[1]:
                    yield f"{tier.value}|{entry_id}", (fields or {}).get("job")
                if res[0] == "0-0" and not res[1]:
                    break  # scanned the whole pending list
            for _ in range(_BATCH):
                res = await r.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
                if not res or not res[0][1]:
                    break
                entry_id, fields = res[0][1][0]
                yield f"{tier.value}|{entry_id}", (fields or {}).get("job")

    async def pending(self, r: aioredis.Redis, consumer: str) -> list[tuple[str, str | None]]:
        """(entry, job id) of every entry pending on `consumer` (what it held when it died)."""
        out: list[tuple[str, str | None]] = []
        for tier in TIERS_IN_CLAIM_ORDER:
            stream = self.stream(tier)
            for p in await r.xpending_range(stream, GROUP, min="-", max="+", count=10_000, consumername=consumer):
                entry_id = p["message_id"]
                entries = await r.xrange(stream, entry_id, entry_id)
                out.append((f"{tier.value}|{entry_id}", entries[0][1].get("job") if entries else None))
        return out
