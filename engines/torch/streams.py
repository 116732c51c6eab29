"""Per-request output slots between the engine thread and the event loop.

The engine thread `put`s deltas; a slot merges whatever the consumer has not read yet into one
pending `RequestOutput` and wakes the loop at most once per batch of puts, so a slow consumer
costs one pending output (its not-yet-read tokens), never a growing queue of objects.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

from tokenrelay_engines.base import RequestOutput
from tokenrelay_engines.outputs import merge_outputs


class OutputSlot:
    """One request's pending output. `put` from any thread; `get` on the slot's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None  # guarded by _lock
        self._wake_scheduled = False  # guarded by _lock
        self._closed = False  # guarded by _lock: the final output went in
        self._event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if self.put_nowake(output):
            wake_slots(self._loop, [self])

    def put_nowake(self, output: RequestOutput) -> bool:
        """Store `output`; True when the caller must wake the slot (`wake_slots`), which lets an
        engine step wake all its slots with one call into the loop instead of one per request."""
        with self._lock:
            if self._closed:
                return False
            if self._pending is None:
                self._pending = output
            else:
                merge_outputs(self._pending, output)
            self._closed = output.finished
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        return wake

    def _wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        self._event.set()

    def _take(self) -> RequestOutput | None:
        with self._lock:
            out, self._pending = self._pending, None
            return out

    async def get(self) -> RequestOutput:
        while True:
            out = self._take()
            if out is not None:
                return out
            self._event.clear()
            out = self._take()
            if out is not None:
                return out
            await self._event.wait()


def put_all(deliveries: list[tuple[OutputSlot, RequestOutput]]) -> None:
    """Put one step's outputs, from any thread, waking their loop once rather than once per slot."""
    to_wake = [slot for slot, output in deliveries if slot.put_nowake(output)]
    if to_wake:
        wake_slots(to_wake[0]._loop, to_wake)


def wake_slots(loop: asyncio.AbstractEventLoop, slots: list[OutputSlot]) -> None:
    """Wake `slots` (all on `loop`) from any thread with one call_soon_threadsafe."""
    try:
        loop.call_soon_threadsafe(_wake_all, slots)
    except RuntimeError:
        pass  # the loop is closed: nobody is listening any more


def _wake_all(slots: list[OutputSlot]) -> None:
    for slot in slots:
        slot._wake()


class RequestStream:
    """The async iterator `add_request` returns. Closing it (or dropping it) before the final
    output tells the engine through `on_close(request_id, finished=False)`, which aborts."""

    def __init__(self, request_id: str, slot: OutputSlot,
                 on_close: Callable[[str, bool], None]) -> None:
        self.request_id = request_id
        self._slot = slot
        self._on_close: Callable[[str, bool], None] | None = on_close
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._on_close is None:
            raise StopAsyncIteration
        out = await self._slot.get()
        if out.finished:
            self._finished = True
            self._close()
        return out

    def _close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self.request_id, self._finished)

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()


class Throughput:
    """Tokens per second over a recent window; record on one thread, read on another."""

    def __init__(self, window_s: float = 5.0, max_samples: int = 4096) -> None:
        self._window_s = window_s
        self._lock = threading.Lock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=max_samples)

    def record(self, now: float, num_tokens: int) -> None:
        with self._lock:
            self._samples.append((now, num_tokens))

    def rate(self, now: float) -> float:
        with self._lock:
            recent = [(t, n) for t, n in self._samples if now - t <= self._window_s]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span
