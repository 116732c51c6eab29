"""Wiring of the jobs feature into a server: flags -> JobsConfig, the store, the manager, the
webhook sender and the gRPC servicer, with one start / stop.

    parser = argparse.ArgumentParser(); add_jobs_arguments(parser)
    jobs = JobsComponent(jobs_config_from_args(parser.parse_args()), engine, health=serving_state)
    jobs.register(grpc_server)      # before the server starts
    await jobs.open()               # the store: reads are served, submits wait for the engine
    await jobs.start()              # once the engine is ready: starts claiming
    await jobs.stop()               # on shutdown: stop claiming, running jobs finish or go back

With a ServingState, Jobs readiness (health service `tokenrelay.v1.JobsService`) also follows
the store: NOT_SERVING while it cannot be reached, SERVING again once it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable

import grpc
from tokenrelay.v1 import jobs_pb2_grpc

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_server.chat import ChatPrompts
from tokenrelay_server.health import JOBS_SERVICE, ServingState
from tokenrelay_server.jobs.manager import JobManager
from tokenrelay_server.jobs.model import Job, JobsConfig
from tokenrelay_server.jobs.servicer import JobsServiceServicer
from tokenrelay_server.jobs.store import JobStore, StoreUnavailable, open_store
from tokenrelay_server.jobs.webhooks import (
    WebhookSender, add_webhook_arguments, validate_webhook_url, webhook_config_from_args,
)
from tokenrelay_server.limits import InputLimits

log = logging.getLogger(__name__)


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    d = JobsConfig()
    group = parser.add_argument_group("jobs")
    group.add_argument("--jobs-store", default=d.store_url,
                       help="sqlite:///abs/path.db, sqlite://relative.db or redis://host:port/db")
    group.add_argument("--jobs-max-running", type=int, default=d.max_running,
                       help="jobs in the engine at once on this replica")
    group.add_argument("--jobs-queue-ttl-seconds", type=float, default=d.queue_ttl,
                       help="default: a job not started within this time expires (0: never)")
    group.add_argument("--jobs-retention-seconds", type=float, default=d.retention,
                       help="default: an ended job is deleted this long after it ended (0: kept)")
    group.add_argument("--jobs-max-attempts", type=int, default=d.max_attempts,
                       help="default: attempts before a failing job goes to dead_letter")
    group.add_argument("--jobs-lease-seconds", type=float, default=d.lease,
                       help="a claimed job returns to the queue when its replica misses heartbeats this long")
    group.add_argument("--jobs-poll-seconds", type=float, default=d.poll_interval,
                       help="how often an idle replica looks for jobs submitted elsewhere")
    group.add_argument("--jobs-stop-grace-seconds", type=float, default=d.stop_grace,
                       help="on shutdown, running jobs may finish this long before going back to the queue")
    group.add_argument("--jobs-store-check-seconds", type=float, default=d.store_check_interval,
                       help="how often the store is pinged; Jobs readiness is NOT_SERVING while it is down")
    group.add_argument("--replica-id", default="",
                       help="stable name of this replica (default: the host name for SQLite, random for Redis)")
    add_webhook_arguments(parser)


def jobs_config_from_args(args: argparse.Namespace) -> JobsConfig:
    """Raises ValueError on a bad combination."""
    store = args.jobs_store
    replica = args.replica_id
    if not replica and store.startswith("sqlite"):
        replica = f"local-{socket.gethostname()}"  # one process per file: a restart is the same replica
    return JobsConfig(store_url=store, max_running=args.jobs_max_running, queue_ttl=args.jobs_queue_ttl_seconds,
                      retention=args.jobs_retention_seconds, max_attempts=args.jobs_max_attempts,
                      lease=args.jobs_lease_seconds, replica_id=replica, poll_interval=args.jobs_poll_seconds,
                      stop_grace=args.jobs_stop_grace_seconds, store_check_interval=args.jobs_store_check_seconds,
                      webhook=webhook_config_from_args(args))


class JobsComponent:
    def __init__(self, config: JobsConfig, engine: AsyncEngine, *, store: JobStore | None = None,
                 webhook_sender: WebhookSender | None = None, health: ServingState | None = None,
                 attempt_context: Callable[[Job], contextlib.AbstractContextManager] | None = None,
                 limits: InputLimits = InputLimits()) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config.store_url)
        webhook = config.webhook
        if webhook_sender is None and webhook is not None and webhook.enabled:
            webhook_sender = WebhookSender(webhook)
        check = (functools.partial(validate_webhook_url, config=webhook_sender.config)
                 if webhook_sender is not None else None)
        chat = ChatPrompts(engine)
        self.manager = JobManager(config, self.store, engine, webhooks=webhook_sender,
                                  attempt_context=attempt_context, encode_chat=chat.encode)
        self._engine_started = asyncio.Event()  # set by start(): submits before it wait for it
        self.servicer = JobsServiceServicer(config, self.manager, engine, check, health, self._engine_started,
                                            limits, chat=chat)
        self._health = health
        self._store_watch: asyncio.Task | None = None
        self._opened = False
        self._started = False

    def register(self, server: grpc.aio.Server) -> None:
        jobs_pb2_grpc.add_JobsServiceServicer_to_server(self.servicer, server)

    async def open(self) -> None:
        """Open the store: the API serves reads at once; submits wait until start()."""
        if not self._opened:
            await self.store.open()
            self._opened = True
            if self._health is not None:
                self._store_watch = asyncio.create_task(self._watch_store(), name="jobs-store-watch")

    async def start(self) -> None:
        """Open the store and start claiming jobs. Call once the engine is ready."""
        await self.open()
        if not self._started:
            await self.manager.start()
            self._started = True
        self._engine_started.set()

    async def stop(self, grace: float | None = None) -> None:
        if self._store_watch is not None:
            self._store_watch.cancel()
            with contextlib.suppress(BaseException):
                await self._store_watch
            self._store_watch = None
        if self._started:
            await self.manager.stop(grace)
            self._started = False
        if self._opened:
            await self.store.close()
            self._opened = False

    async def _watch_store(self) -> None:
        """Jobs readiness follows the store: NOT_SERVING while a ping fails, SERVING once it answers."""
        assert self._health is not None
        interval = self.config.store_check_interval
        while True:
            try:
                await asyncio.wait_for(self.store.ping(), timeout=max(interval, 1.0))
                up, why = True, ""
            except (StoreUnavailable, TimeoutError) as exc:
                up, why = False, f"jobs store unavailable: {exc or type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - a store that cannot answer a ping is not ready
                log.exception("jobs store ping failed")
                up, why = False, f"jobs store ping failed: {type(exc).__name__}"
            await self._health.set_service_available(JOBS_SERVICE, up, why)
            await asyncio.sleep(interval)  # a probe period, not a synchronisation
