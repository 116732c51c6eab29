"""Both job stores: the tenant and the submitting trace survive a round trip, ListJobs filters
by tenant across pages, and idempotency keys are scoped per tenant."""

from __future__ import annotations

import pytest

from tokenrelay_server.jobs.model import IdempotencyConflict, JobState
from tokenrelay_server.jobs.store import JobStore
from tests.jobs.conftest import StoreFactory
from tests.jobs.helpers import make_job


def _job(tenant: str, **kw):
    job = make_job(**kw)
    job.tenant = tenant
    job.trace_parent = f"00-{'a' * 32}-{'b' * 16}-01" if tenant else ""
    return job


async def test_tenant_and_trace_parent_round_trip(stores: StoreFactory) -> None:
    store = await stores.open()
    job = _job("alice")
    await store.create(job)
    reopened = await stores.open()
    got = await reopened.get(job.job_id)
    assert got.tenant == "alice" and got.trace_parent == job.trace_parent


async def test_list_filters_by_tenant_across_pages(store: JobStore) -> None:
    ids: dict[str, list[str]] = {"alice": [], "bob": [], "": []}
    for i in range(9):
        tenant = ("alice", "bob", "")[i % 3]
        job = _job(tenant, now=1000.0 + i)
        await store.create(job)
        ids[tenant].append(job.job_id)
    for tenant, expected in ids.items():
        seen, token = [], ""
        while True:
            page, token = await store.list(frozenset(), 2, token, tenant)
            assert all(j.tenant == tenant for j in page)
            seen += [j.job_id for j in page]
            if not token:
                break
        assert seen == expected
    everything, _ = await store.list(frozenset(), 100, "")
    assert len(everything) == 9  # no tenant given: every job (operators, sweeps)
    queued, _ = await store.list(frozenset({JobState.QUEUED}), 100, "", "bob")
    assert [j.job_id for j in queued] == ids["bob"]


async def test_idempotency_key_is_scoped_per_tenant(store: JobStore) -> None:
    a, created_a = await store.create(_job("alice", key="k1", fingerprint="fa"))
    b, created_b = await store.create(_job("bob", key="k1", fingerprint="fb"))
    assert created_a and created_b and a.job_id != b.job_id
    again, created = await store.create(_job("alice", key="k1", fingerprint="fa"))
    assert not created and again.job_id == a.job_id
    with pytest.raises(IdempotencyConflict):
        await store.create(_job("bob", key="k1", fingerprint="other"))
    await store.delete(a.job_id)  # frees alice's key only
    fresh, created = await store.create(_job("alice", key="k1", fingerprint="fa2"))
    assert created and fresh.job_id != a.job_id
    still, created = await store.create(_job("bob", key="k1", fingerprint="fb"))
    assert not created and still.job_id == b.job_id
