"""Every job belongs to its tenant: another tenant's job is NOT_FOUND, ListJobs lists only the
caller's, idempotency keys are per tenant, and the queued-jobs cap is per tenant."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tokenrelay_server.auth import AuthConfig, key_digest
from tokenrelay_server.jobs.model import JobsConfig
from tokenrelay_server.security import SecurityConfig
from tokenrelay import AsyncClient, NotFoundError, ResourceExhaustedError
from tokenrelay.v1 import jobs_pb2

ALICE_KEY, BOB_KEY = "tr-alice-jobs-key", "tr-bob-jobs-key"


@pytest.fixture
def security(tmp_path: Path) -> SecurityConfig:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {key_digest(ALICE_KEY): "alice", key_digest(BOB_KEY): "bob"},
                                "tenants": {"alice": {"max_queued_jobs": 2}}}))
    return SecurityConfig(auth=AuthConfig(api_keys_file=str(keys)))


async def _until_state(client: AsyncClient, job_id: str, state: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while (await client.get(job_id)).state != state:
        assert time.monotonic() < end, f"job {job_id} never reached state {state}"
        await asyncio.sleep(0.01)  # polling GetJob, bounded above


async def test_tenant_b_cannot_see_or_touch_tenant_as_jobs(synthetic_server_factory, security, tmp_path) -> None:
    srv = await synthetic_server_factory(security=security, itl_ms=20.0,
                                         jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/t.db", poll_interval=0.05))
    async with AsyncClient(srv.address, timeout=20, retries=0, api_key=ALICE_KEY) as alice, \
            AsyncClient(srv.address, timeout=20, retries=0, api_key=BOB_KEY) as bob:
        running = (await alice.submit("long", max_tokens=500, ignore_eos=True)).job
        done = (await alice.submit("short", max_tokens=2)).job
        await alice.wait(done.job_id, timeout=20)
        bobs = (await bob.submit("bob's", max_tokens=2)).job
        for job_id in (running.job_id, done.job_id):
            with pytest.raises(NotFoundError):
                await bob.get(job_id)
            with pytest.raises(NotFoundError):
                async for _ in bob.watch(job_id):
                    pass
            with pytest.raises(NotFoundError):
                await bob.cancel(job_id)
            with pytest.raises(NotFoundError):
                await bob.delete(job_id)
        # The same answer as for a job that does not exist: nothing leaks.
        with pytest.raises(NotFoundError) as missing:
            await bob.get("job_" + "0" * 32)
        with pytest.raises(NotFoundError) as foreign:
            await bob.get(running.job_id)
        assert str(foreign.value).replace(running.job_id, "X") == str(missing.value).replace("job_" + "0" * 32, "X")
        assert [j.job_id for j in (await bob.list_jobs()).jobs] == [bobs.job_id]
        assert {j.job_id for j in (await alice.list_jobs()).jobs} == {running.job_id, done.job_id}
        # Alice's jobs are untouched by Bob's attempts.
        assert (await alice.get(running.job_id)).state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
        assert (await alice.cancel(running.job_id)).state == jobs_pb2.JOB_STATE_CANCELLED
        await alice.delete(done.job_id)


async def test_idempotency_keys_are_per_tenant(synthetic_server_factory, security) -> None:
    srv = await synthetic_server_factory(security=security)
    async with AsyncClient(srv.address, timeout=20, retries=0, api_key=ALICE_KEY) as alice, \
            AsyncClient(srv.address, timeout=20, retries=0, api_key=BOB_KEY) as bob:
        a = await alice.submit("same", max_tokens=2, idempotency_key="order-42")
        b = await bob.submit("different", max_tokens=3, idempotency_key="order-42")
        assert a.created and b.created and a.job.job_id != b.job.job_id
        again = await alice.submit("same", max_tokens=2, idempotency_key="order-42")
        assert not again.created and again.job.job_id == a.job.job_id


async def test_queued_jobs_cap_is_per_tenant(synthetic_server_factory, security, tmp_path) -> None:
    srv = await synthetic_server_factory(security=security, itl_ms=20.0, jobs=JobsConfig(
        store_url=f"sqlite://{tmp_path}/q.db", poll_interval=0.05, max_running=1))
    async with AsyncClient(srv.address, timeout=20, retries=0, api_key=ALICE_KEY) as alice, \
            AsyncClient(srv.address, timeout=20, retries=0, api_key=BOB_KEY) as bob:
        first = (await alice.submit("runs", max_tokens=500, ignore_eos=True)).job
        await _until_state(alice, first.job_id, jobs_pb2.JOB_STATE_RUNNING)
        queued = [(await alice.submit(f"waits {i}", max_tokens=2)).job for i in range(2)]
        with pytest.raises(ResourceExhaustedError) as err:
            await alice.submit("one too many", max_tokens=2)
        info = err.value.error_info
        assert info.reason == "TENANT_QUOTA_EXCEEDED" and info.metadata["limit"] == "max_queued_jobs"
        assert err.value.retry_delay and err.value.retry_delay > 0
        assert (await bob.submit("bob is not capped", max_tokens=2)).created
        await alice.cancel(queued[0].job_id)
        assert (await alice.submit("fits again", max_tokens=2)).created
        await alice.cancel(first.job_id)
