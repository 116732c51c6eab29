"""Tenants: per-tenant limits and the count of each tenant's in-flight interactive requests.

A tenant over its cap gets RESOURCE_EXHAUSTED with RetryInfo and an ErrorInfo whose reason is
TENANT_QUOTA_EXCEEDED, while other tenants keep being served: the global admission limit
(server.admission) still applies on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrelay_server.errors import AdmissionRejected

QUOTA_REASON = "TENANT_QUOTA_EXCEEDED"


@dataclass(slots=True, frozen=True)
class TenantLimits:
    max_in_flight_requests: int = 0  # interactive (Generate / GenerateStream) at once; 0: no cap
    max_queued_jobs: int = 0  # jobs queued at once; 0: no cap

    def __post_init__(self) -> None:
        if self.max_in_flight_requests < 0 or self.max_queued_jobs < 0:
            raise ValueError("tenant limits must be >= 0 (0: no cap)")


class TenantQuotaExceeded(AdmissionRejected):
    def __init__(self, message: str, retry_after_s: float, *, tenant: str, limit: str, value: int) -> None:
        super().__init__(message, retry_after_s, reason=QUOTA_REASON)
        self.metadata = {"tenant": tenant, "limit": limit, "value": str(value)}


class TenantSlot:
    """A held in-flight slot; releasing twice is harmless. A context manager."""

    __slots__ = ("_limiter", "_tenant")

    def __init__(self, limiter: TenantLimiter | None, tenant: str) -> None:
        self._limiter = limiter
        self._tenant = tenant

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self._tenant)
            self._limiter = None

    def __enter__(self) -> TenantSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TenantLimiter:
    """Owns the number of interactive requests each tenant has in flight."""

    def __init__(self, retry_after_ms: int = 200) -> None:
        self._retry_after_s = retry_after_ms / 1000
        self._in_flight: dict[str, int] = {}

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def acquire(self, tenant: str, limits: TenantLimits) -> TenantSlot:
        """A slot for one interactive request; raises TenantQuotaExceeded at the tenant's cap."""
        cap = limits.max_in_flight_requests
        held = self._in_flight.get(tenant, 0)
        if cap and held >= cap:
            raise TenantQuotaExceeded(
                f"tenant {tenant!r} has {held} requests in flight (its limit is {cap}); retry later",
                self._retry_after_s, tenant=tenant, limit="max_in_flight_requests", value=cap)
        self._in_flight[tenant] = held + 1
        return TenantSlot(self, tenant)

    def _release(self, tenant: str) -> None:
        left = self._in_flight.get(tenant, 0) - 1
        if left > 0:
            self._in_flight[tenant] = left
        else:
            self._in_flight.pop(tenant, None)


def check_queued_jobs(tenant: str, limits: TenantLimits, queued: int, retry_after_s: float) -> None:
    """Raises TenantQuotaExceeded when the tenant already has its cap of queued jobs."""
    cap = limits.max_queued_jobs
    if cap and queued >= cap:
        raise TenantQuotaExceeded(f"tenant {tenant!r} has {queued} jobs queued (its limit is {cap}); "
                                  "retry later", retry_after_s, tenant=tenant, limit="max_queued_jobs", value=cap)
