"""The server's typed configuration: built once in `server.main`, passed down, never mutated."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenrelay_engines.config import TorchEngineConfig, TrtllmEngineConfig
from tokenrelay_engines.synthetic import SyntheticEngineConfig
from tokenrelay_server.jobs.model import JobsConfig
from tokenrelay_server.limits import InputLimits
from tokenrelay_server.security import SecurityConfig
from tokenrelay_server.telemetry.config import TelemetryConfig

ENGINES = ("torch", "synthetic", "trtllm")


@dataclass(slots=True, frozen=True)
class AdmissionConfig:
    max_pending_requests: int = 256  # interactive requests in flight (queued + running)
    max_pending_prompt_tokens: int = 1 << 20  # their prompt tokens, summed
    retry_after_ms: int = 200  # RetryInfo delay suggested when full

    def __post_init__(self) -> None:
        if self.max_pending_requests < 1 or self.max_pending_prompt_tokens < 1:
            raise ValueError("max_pending_requests and max_pending_prompt_tokens must be >= 1")
        if self.retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")


@dataclass(slots=True, frozen=True)
class GrpcServerOptions:
    """Transport limits of the serving port (grpc core channel arguments)."""

    keepalive_time_s: float = 60.0  # ping an idle connection this often ...
    keepalive_timeout_s: float = 20.0  # ... and close it when the ping is not answered in time
    max_connection_idle_s: float = 300.0  # close connections without calls this long (0: never)
    max_connection_age_s: float = 0.0  # close connections this old, to rebalance (0: never)
    max_connection_age_grace_s: float = 300.0  # calls on an aged connection may finish this long
    max_concurrent_streams: int = 1000  # calls at once on one connection
    max_receive_message_bytes: int = 4 << 20
    max_send_message_bytes: int = 64 << 20
    max_metadata_bytes: int = 16 << 10  # all request headers together
    min_client_ping_interval_s: float = 10.0  # clients may send keepalive pings this often
    # Let several processes bind the same port (the kernel spreads connections over them). Off by
    # default: on, a second server started by mistake on a busy port would silently share it.
    so_reuseport: bool = False

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0 or self.max_concurrent_streams < 1:
            raise ValueError("keepalive time and timeout must be > 0 and max_concurrent_streams >= 1")
        if min(self.max_receive_message_bytes, self.max_send_message_bytes, self.max_metadata_bytes) < 1024:
            raise ValueError("message and metadata limits must be >= 1024 bytes")

    def channel_options(self) -> list[tuple[str, int]]:
        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        options = [
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_interval_s)),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.so_reuseport", int(self.so_reuseport)),
        ]
        if self.max_connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)))
        if self.max_connection_age_s:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_s)))
            options.append(("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)))
        return options


@dataclass(slots=True, frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0: an ephemeral port
    engine: str = "torch"
    # torch engine: the engine core (scheduler, block manager, runner) runs in its own process
    # (engines/core/process.py) and this process is its front end; False: on a thread in this process
    engine_process: bool = True
    engine_core_address: str = ""  # a running engine core's Unix socket (front ends of --api-server-count)
    api_server_count: int = 1  # front-end processes on one port over one engine core (server/supervisor.py)
    torch: TorchEngineConfig = field(default_factory=TorchEngineConfig)
    synthetic: SyntheticEngineConfig = field(default_factory=SyntheticEngineConfig)
    trtllm: TrtllmEngineConfig = field(default_factory=TrtllmEngineConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    drain_grace_seconds: float = 30.0  # in-flight calls may finish this long after SIGTERM
    health_check_interval_seconds: float = 2.0  # engine watchdog period
    warmup: bool = True  # run one generation before reporting SERVING
    exit_on_engine_death: bool = True  # exit non-zero once the engine died, for a restart
    engine_death_grace_seconds: float = 5.0  # calls failing after engine death may end this long
    grpc: GrpcServerOptions = field(default_factory=GrpcServerOptions)
    limits: InputLimits = field(default_factory=InputLimits)
    log_level: str = "INFO"
    jobs: JobsConfig | None = None  # durable jobs; None: the Jobs API answers UNIMPLEMENTED
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS, auth, tenants, health port
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # metrics, traces, logs
    uvloop: bool = True  # run the event loop on uvloop when it is installed

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], not {self.port}")
        if self.drain_grace_seconds < 0:
            raise ValueError("drain_grace_seconds must be >= 0")
        if self.health_check_interval_seconds <= 0:
            raise ValueError("health_check_interval_seconds must be > 0")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {self.log_level!r}")
        if self.api_server_count < 1:
            raise ValueError("api_server_count must be >= 1")
        if self.api_server_count > 1 and not (self.engine == "torch" and self.engine_process):
            raise ValueError("--api-server-count > 1 needs --engine torch with --engine-process on")
        if self.engine_death_grace_seconds < 0:
            raise ValueError("engine_death_grace_seconds must be >= 0")
