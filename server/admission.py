"""Bounded admission of interactive requests (Generate / GenerateStream).

Two limits: requests in flight and the sum of their prompt tokens. A request that does not
fit is refused at once (RESOURCE_EXHAUSTED with a RetryInfo delay) before any token is sent;
nothing queues without bound in front of the engine.
"""

from __future__ import annotations

import asyncio

from tokenrelay_server.config import AdmissionConfig
from tokenrelay_server.errors import AdmissionRejected


class AdmissionTicket:
    """A held admission slot; `release()` is idempotent. Usable as a context manager."""

    __slots__ = ("_controller", "prompt_tokens", "_released")

    def __init__(self, controller: AdmissionController, prompt_tokens: int) -> None:
        self._controller = controller
        self.prompt_tokens = prompt_tokens
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self)

    def __enter__(self) -> AdmissionTicket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdmissionController:
    """Owns the count of admitted interactive requests and their prompt tokens."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.prompt_tokens = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def capacity(self) -> int:
        return self.config.max_pending_requests

    def try_acquire(self, prompt_tokens: int) -> AdmissionTicket:
        c = self.config
        retry = c.retry_after_ms / 1000
        if self.in_flight >= c.max_pending_requests:
            raise AdmissionRejected(f"server busy: {self.in_flight} requests in flight (limit "
                                    f"{c.max_pending_requests}); retry later", retry)
        if self.in_flight > 0 and self.prompt_tokens + prompt_tokens > c.max_pending_prompt_tokens:
            raise AdmissionRejected(f"server busy: {self.prompt_tokens} prompt tokens pending (limit "
                                    f"{c.max_pending_prompt_tokens}); retry later", retry,
                                    reason="PROMPT_TOKENS_FULL")
        self.in_flight += 1
        self.prompt_tokens += prompt_tokens
        self._idle.clear()
        return AdmissionTicket(self, prompt_tokens)

    def _release(self, ticket: AdmissionTicket) -> None:
        self.in_flight -= 1
        self.prompt_tokens -= ticket.prompt_tokens
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no admitted request is in flight; True if it got there."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
