"""Readiness and liveness over grpc.health.v1, and the engine watchdog.

"" is liveness: SERVING while the process can serve at all (also while draining), NOT_SERVING
once the engine is dead. The service names are readiness: NOT_SERVING until start-up and
warm-up finished, SERVING after, NOT_SERVING again while draining or once the engine is dead.
`ServingState` is the one owner of that state; servicers ask it whether to take a call.
"""

from __future__ import annotations

import asyncio
import enum
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tokenrelay_engines.base import AsyncEngine, EngineDeadError
from tokenrelay_server.errors import NotReady, ServerDraining

log = logging.getLogger(__name__)

TEXT_GENERATION_SERVICE = "tokenrelay.v1.TextGenerationService"
JOBS_SERVICE = "tokenrelay.v1.JobsService"
READINESS_SERVICES = (TEXT_GENERATION_SERVICE, JOBS_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    DEAD = "dead"


class ServingState:
    """The server's phase, mirrored into the grpc.health.v1 servicer."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.phase = Phase.STARTING
        self.dead_reason: str | None = None
        self.dead = asyncio.Event()  # set once the engine died: the process should exit
        self.stopping = asyncio.Event()  # set once draining began: long streams (watches) end
        self.unavailable: dict[str, str] = {}  # readiness service -> why it cannot serve now

    async def _publish(self) -> None:
        live = _NOT_SERVING if self.phase is Phase.DEAD else _SERVING
        await self.servicer.set("", live)
        for name in READINESS_SERVICES:
            ready = self.phase is Phase.SERVING and name not in self.unavailable
            await self.servicer.set(name, _SERVING if ready else _NOT_SERVING)

    async def set_service_available(self, service: str, available: bool, reason: str = "") -> None:
        """One service's own dependency (the jobs store) went down or came back: that service's
        readiness is NOT_SERVING while it is down, whatever the phase."""
        if available == (service not in self.unavailable):
            return
        if available:
            del self.unavailable[service]
            log.info("%s is available again", service)
        else:
            self.unavailable[service] = reason
            log.warning("%s is unavailable: %s", service, reason)
        await self._publish()

    async def initialize(self) -> None:
        await self._publish()

    async def set_serving(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.SERVING
            await self._publish()

    async def set_draining(self) -> None:
        if self.phase in (Phase.STARTING, Phase.SERVING):
            self.phase = Phase.DRAINING
            self.stopping.set()
            await self._publish()

    async def set_dead(self, reason: str) -> None:
        if self.phase is not Phase.DEAD:
            log.error("engine is dead: %s", reason)
            self.phase, self.dead_reason = Phase.DEAD, reason
            self.dead.set()
            await self._publish()

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    def check_accepting(self) -> None:
        """Raise the error a new call gets when the server is not serving."""
        if self.phase is Phase.SERVING:
            return
        if self.phase is Phase.DRAINING:
            raise ServerDraining("server is draining; retry on another replica")
        if self.phase is Phase.DEAD:
            raise EngineDeadError(self.dead_reason or "engine is dead")
        raise NotReady("server is starting (model loading / warm-up); retry shortly")


async def watch_engine(engine: AsyncEngine, state: ServingState, interval: float) -> None:
    """Poll engine.check_health() every `interval` s; a failure marks the server dead."""
    while state.phase is not Phase.DEAD:
        try:
            await asyncio.wait_for(engine.check_health(), timeout=max(interval, 1.0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            await state.set_dead(f"{type(exc).__name__}: {exc}")
            return
        await asyncio.sleep(interval)
