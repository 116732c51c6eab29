"""The job store as metrics see it: counts jobs submitted, attempts started, jobs ended (by
state and tier) and webhook deliveries (by outcome) as the store reports them done."""

from __future__ import annotations

from typing import Any

from tokenrelay_server.jobs.model import Job, WebhookDelivery
from tokenrelay_server.jobs.store import JobStore
from tokenrelay_server.telemetry.metrics import Metrics  # imported only with metrics on (see Telemetry)


class InstrumentedJobStore:
    def __init__(self, store: JobStore, metrics: Metrics) -> None:
        self.store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _ended(self, job: Job | None) -> None:
        if job is not None and job.state.terminal:
            self._metrics.jobs_finished.labels(job.state.value, job.tier.value).inc()

    async def create(self, job: Job, *args: Any, **kwargs: Any) -> tuple[Job, bool]:
        stored, created = await self.store.create(job, *args, **kwargs)
        if created:
            self._metrics.jobs_submitted.labels(stored.tier.value).inc()
        return stored, created

    async def claim(self, *args: Any, **kwargs: Any) -> Job | None:
        job = await self.store.claim(*args, **kwargs)
        if job is not None:
            self._metrics.job_attempts.labels(job.tier.value).inc()
        return job

    async def finish(self, *args: Any, **kwargs: Any) -> Job | None:
        job = await self.store.finish(*args, **kwargs)
        self._ended(job)
        return job

    async def release(self, *args: Any, **kwargs: Any) -> Job | None:
        job = await self.store.release(*args, **kwargs)
        self._ended(job)
        return job

    async def sweep(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.store.sweep(*args, **kwargs)
        for job in result[0]:
            self._ended(job)
        return result

    async def add_webhook_delivery(self, job_id: str, delivery: WebhookDelivery, *args: Any, **kwargs: Any) -> None:
        await self.store.add_webhook_delivery(job_id, delivery, *args, **kwargs)
        if 200 <= delivery.http_status < 300:
            outcome = "success"
        elif delivery.http_status:
            outcome = "http_error"
        else:
            outcome = "network_error"
        self._metrics.webhook_deliveries.labels(outcome).inc()
