"""The job worker of one replica: claims jobs, runs them through the engine, persists output.

- At most `max_running` jobs are in the engine at once; claims go urgent, standard, bulk.
- Each attempt rebuilds the engine Request from the stored params (seed included), so a
  re-run after a crash yields the same tokens: the tokens already persisted are checked against
  it and only the new ones are appended.
- A heartbeat extends the lease while the job runs; losing it (another replica took the job,
  it was cancelled or deleted) aborts the engine request.
- An engine error sends the job back to the queue until its attempts are used up (dead letter).
- A sweeper expires queued jobs past their TTL and deletes ended jobs past retention.
- Webhooks go out after the terminal state is stored; each attempt is recorded on the job.
- A store outage (StoreUnavailable) does not end a running job: its store writes are retried
  with backoff until the store is back (or the job was taken over meanwhile); claiming and
  sweeping pause and resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenrelay_engines.base import AsyncEngine, EngineDeadError, FinishReason, InvalidRequest
from tokenrelay_server.chat import ChatEncoder
from tokenrelay_server.errors import FailedPrecondition
from tokenrelay_server.jobs import convert
from tokenrelay_server.jobs.model import Delta, Job, JobsConfig, JobState, Transition, merge_deltas
from tokenrelay_server.jobs.store import JobStore, StoreUnavailable
from tokenrelay_server.jobs.watch import watch_job
from tokenrelay_server.jobs.webhooks import DeliveryAttempt, WebhookSender

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRY_FIRST = 0.05  # seconds before retrying a store write through an outage; doubles each time
_RETRY_MAX = 1.0


@dataclass(slots=True)
class _Attempt:
    """One job running on this replica."""

    job: Job
    request_id: str
    task: asyncio.Task | None = None
    lost: bool = False  # the job is no longer ours: write nothing more
    stopping: bool = False  # aborted by stop(): give the attempt back


class _Lost(Exception):
    pass


def _raise_if_cancelled() -> None:
    """Some clients (redis-py) turn a cancellation into their own error: honour it anyway."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class JobManager:
    def __init__(self, config: JobsConfig, store: JobStore, engine: AsyncEngine, *,
                 webhooks: WebhookSender | None = None, clock: Callable[[], float] = time.time,
                 persist_interval: float = 0.05,
                 attempt_context: Callable[[Job], contextlib.AbstractContextManager] | None = None,
                 encode_chat: ChatEncoder | None = None) -> None:
        self.config = config
        self._attempt_context = attempt_context or (lambda job: contextlib.nullcontext())  # e.g. a span
        self._encode_chat = encode_chat  # renders chat-message prompts (server.chat.ChatPrompts.encode)
        self.replica_id = config.replica_id or f"replica-{secrets.token_hex(6)}"
        self._store = store
        self._engine = engine
        self._webhooks = webhooks
        self._clock = clock
        self._persist_interval = persist_interval
        self._slots = asyncio.Semaphore(config.max_running)
        self._wakeup = asyncio.Event()
        self._running: dict[str, _Attempt] = {}
        self._background: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = False

    @property
    def store(self) -> JobStore:
        return self._store

    @property
    def running_job_ids(self) -> list[str]:
        return list(self._running)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await self._store.recover(self.replica_id, self._clock())
        if recovered:
            log.info("re-queued %d job(s) this replica was running when it stopped", recovered)
        self._loops = [asyncio.create_task(self._claim_loop(), name="jobs-claim"),
                       asyncio.create_task(self._sweep_loop(), name="jobs-sweep")]

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming; running jobs get `grace` seconds to finish, then go back to the queue."""
        if self._stopping:
            return
        self._stopping = True
        self._wakeup.set()
        if self._loops:
            claim, sweep = self._loops
            sweep.cancel()  # between sweeps, or mid-sweep: each sweep step is its own transaction
            # a claim in flight finishes (and gives the job back); one waiting for a slot is cancelled
            _, pending = await asyncio.wait([claim], timeout=0.0 if self._slots.locked() else 2.0)
            for task in pending:
                task.cancel()
            for task in self._loops:
                with contextlib.suppress(BaseException):
                    await task
        grace = self.config.stop_grace if grace is None else grace
        tasks = [a.task for a in self._running.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for attempt in list(self._running.values()):
            attempt.stopping = True
            with contextlib.suppress(Exception):
                await self._engine.abort(attempt.request_id)
        tasks = [a.task for a in self._running.values() if a.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 5.0))
            for task in pending:
                task.cancel()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

    # -- the API side -----------------------------------------------------------------------
    async def submit(self, job: Job) -> tuple[Job, bool]:
        stored, created = await self._store.create(job)
        if created:
            self._wakeup.set()
        return stored, created

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job, keeping the output persisted so far."""
        job = await self._store.get(job_id)
        if job.state.terminal:
            return job
        ids, text = merge_deltas(await self._store.read_deltas(job_id))
        ended = await self._store.finish(job_id, None, JobState.CANCELLED, self._clock(),
                                         result=convert.partial_result(job, ids, text) if ids or text else None)
        attempt = self._running.get(job_id)
        if attempt is not None:
            attempt.lost = True
            await self._engine.abort(attempt.request_id)
        if ended is None:  # it ended meanwhile
            return await self._store.get(job_id)
        self._spawn_webhook(ended)
        return ended

    def watch(self, job_id: str, from_offset: int) -> AsyncIterator[Transition | Delta | Job]:
        """See `server.jobs.watch.watch_job`."""
        return watch_job(self._store, job_id, from_offset)

    # -- the worker side --------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while not self._stopping:
            await self._slots.acquire()
            job = None
            self._wakeup.clear()
            try:
                await self._engine.check_health()
                job = await self._store.claim(self.replica_id, self.config.lease, self._clock())
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except EngineDeadError:
                pass
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    self._slots.release()
                    raise asyncio.CancelledError from None
                if isinstance(exc, StoreUnavailable):
                    log.warning("claiming a job: %s", exc)
                else:
                    log.exception("claiming a job failed")
            if job is not None and self._stopping:
                with contextlib.suppress(StoreUnavailable):  # else its lease runs out: another replica takes it
                    await self._store.release(job.job_id, self.replica_id, self._clock(), error=None,
                                              count_attempt=False)
                job = None
            if job is None:
                self._slots.release()
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.config.poll_interval)
                continue
            attempt = _Attempt(job=job, request_id=f"{job.job_id}.{job.attempts}")
            self._running[job.job_id] = attempt
            attempt.task = asyncio.create_task(self._run(attempt), name=f"job-{job.job_id}")

    async def _sweep_loop(self) -> None:
        while not self._stopping:
            try:
                expired, deleted = await self._store.sweep(self._clock())
                for job in expired:
                    self._spawn_webhook(job)
                if expired or deleted:
                    log.info("jobs sweep: %d expired, %d deleted", len(expired), deleted)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                _raise_if_cancelled()
                log.warning("jobs sweep: %s", exc)
            except Exception:
                _raise_if_cancelled()
                log.exception("jobs sweep failed")
            await asyncio.sleep(self.config.sweep_interval)  # a period, not a synchronisation

    async def _run(self, attempt: _Attempt) -> None:
        job = attempt.job
        heartbeat = asyncio.create_task(self._heartbeat(attempt), name=f"job-heartbeat-{job.job_id}")
        try:
            with self._attempt_context(job):
                await self._attempt(attempt)
        except asyncio.CancelledError:
            raise
        except _Lost:
            pass  # the job is not ours any more: nothing to write
        except Exception as exc:  # never lose the job: back to the queue (the attempt counts)
            _raise_if_cancelled()
            log.exception("job %s attempt %d failed", job.job_id, job.attempts)
            with contextlib.suppress(_Lost):
                await self._release(attempt, convert.error(convert.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
            self._running.pop(job.job_id, None)
            self._slots.release()
            self._wakeup.set()

    async def _heartbeat(self, attempt: _Attempt) -> None:
        period = self.config.lease / 3
        while True:
            await asyncio.sleep(period)  # a period, not a synchronisation
            try:
                ok = await self._store.heartbeat(attempt.job.job_id, self.replica_id, self.config.lease,
                                                 self._clock())
            except StoreUnavailable as exc:
                _raise_if_cancelled()
                log.warning("job %s heartbeat: %s", attempt.job.job_id, exc)
                continue
            except Exception:
                _raise_if_cancelled()
                log.exception("job heartbeat failed")
                continue
            if not ok:
                attempt.lost = True
                await self._engine.abort(attempt.request_id)
                return

    async def _retrying(self, attempt: _Attempt, call: Callable[[], Awaitable[T]]) -> T:
        """A store call of a running attempt, retried with backoff through a store outage: the
        job survives it. Stops when the attempt is lost (or the task is cancelled by stop())."""
        delay = _RETRY_FIRST
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                _raise_if_cancelled()
                if attempt.lost:
                    raise _Lost from exc
                log.log(logging.WARNING if delay == _RETRY_FIRST else logging.DEBUG,
                        "job %s: %s; retrying until the store is back", attempt.job.job_id, exc)
                await asyncio.sleep(delay)  # backoff, not a synchronisation
                delay = min(delay * 2, _RETRY_MAX)

    async def _release(self, attempt: _Attempt, error: convert.JobError | None, *, count: bool = True) -> None:
        if attempt.lost:
            return
        job = await self._retrying(attempt, lambda: self._store.release(
            attempt.job.job_id, self.replica_id, self._clock(), error=error, count_attempt=count))
        if job is not None and job.state.terminal:
            self._spawn_webhook(job)
        self._wakeup.set()

    async def _finish(self, attempt: _Attempt, state: JobState, *, result: bytes | None = None,
                      error: convert.JobError | None = None) -> None:
        if attempt.lost:
            return
        job = await self._retrying(attempt, lambda: self._store.finish(
            attempt.job.job_id, self.replica_id, state, self._clock(), result=result, error=error))
        if job is not None:
            self._spawn_webhook(job)

    async def _attempt(self, attempt: _Attempt) -> None:
        job = attempt.job
        try:
            request = await asyncio.to_thread(
                convert.engine_request, job, info=self._engine.info(), tokenize=self._engine.tokenize,
                arrival_time=time.monotonic(), encode_chat=self._encode_chat)
            request.request_id = attempt.request_id
        except (InvalidRequest, FailedPrecondition) as exc:  # e.g. the model changed since submit: no retry
            await self._finish(attempt, JobState.FAILED, error=convert.error(convert.INVALID_ARGUMENT, str(exc)))
            return
        persisted_ids, _ = merge_deltas(await self._retrying(attempt, lambda: self._store.read_deltas(job.job_id)))
        n_tok, n_chars = job.completion_tokens, job.text_chars
        acc = convert.new_accumulator(job)
        ids: list[int] = []
        text: list[str] = []
        n_text = 0
        last_persist = time.monotonic()

        async def persist() -> None:
            nonlocal n_tok, n_chars, last_persist
            last_persist = time.monotonic()
            if len(ids) < n_tok or n_text < n_chars or (len(ids) == n_tok and n_text == n_chars):
                return  # a re-run still catching up with what was persisted
            joined = "".join(text)
            delta = Delta(n_tok, tuple(ids[n_tok:]), joined[n_chars:], n_chars)
            if not await self._retrying(attempt, lambda: self._store.append_output(
                    job.job_id, self.replica_id, delta, self._clock())):
                attempt.lost = True
                raise _Lost
            n_tok, n_chars = len(ids), n_text

        try:
            stream = self._engine.add_request(request)
        except InvalidRequest as exc:
            await self._finish(attempt, JobState.FAILED, error=convert.error(convert.INVALID_ARGUMENT, str(exc)))
            return
        except EngineDeadError as exc:
            await self._release(attempt, convert.error(convert.UNAVAILABLE, str(exc)), count=False)
            return
        try:
            async for out in stream:
                acc.add(out)
                start = len(ids)
                ids.extend(out.token_ids)
                text.append(out.text)
                n_text += len(out.text)
                check_to = min(len(ids), len(persisted_ids))
                if start < check_to and ids[start:check_to] != persisted_ids[start:check_to]:
                    raise RuntimeError("re-run diverged from the persisted output (non-deterministic engine?)")
                if attempt.lost:
                    raise _Lost
                if not out.finished and time.monotonic() - last_persist >= self._persist_interval:
                    await persist()
            if acc.final is not None and acc.final.finish_reason not in (FinishReason.ERROR, FinishReason.CANCELLED):
                await persist()
        except _Lost:
            return
        finally:
            await stream.aclose()
        final = acc.final
        if final is not None and final.finish_reason not in (FinishReason.ERROR, FinishReason.CANCELLED):
            await self._finish(attempt, JobState.SUCCEEDED, result=convert.result_bytes(acc))
        elif attempt.lost:
            return
        elif attempt.stopping or final is None or final.finish_reason is FinishReason.CANCELLED:
            # stopped here, or aborted outside our control (engine shutdown): give the attempt back
            await self._release(attempt, None if attempt.stopping else convert.error(
                convert.UNAVAILABLE, "the engine aborted the request"), count=False)
        else:
            await self._release(attempt, convert.error(convert.INTERNAL, final.error or "engine error"))

    # -- webhooks ---------------------------------------------------------------------------
    def _spawn_webhook(self, job: Job) -> None:
        if not job.webhook_url or self._webhooks is None or not job.state.terminal:
            return
        task = asyncio.create_task(self._deliver(job), name=f"job-webhook-{job.job_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver(self, job: Job) -> None:
        async def record(a: DeliveryAttempt) -> None:
            await self._store.add_webhook_delivery(job.job_id, convert.webhook_delivery(
                a.attempt, a.time, a.http_status, a.error))

        try:
            assert self._webhooks is not None
            await self._webhooks.deliver(job.webhook_url, f"{job.job_id}.{job.state.value}",
                                         convert.webhook_payload(job), record)
        except asyncio.CancelledError:
            raise
        except Exception:
            _raise_if_cancelled()
            log.exception("webhook for job %s failed", job.job_id)
