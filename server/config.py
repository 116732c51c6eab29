"""The server's typed configuration: built once in `server.main`, passed down, never mutated."""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.config import TorchEngineConfig, TrtllmEngineConfig
from engines.synthetic import SyntheticEngineConfig
from server.jobs.model import JobsConfig

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
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0: an ephemeral port
    engine: str = "torch"
    torch: TorchEngineConfig = field(default_factory=TorchEngineConfig)
    synthetic: SyntheticEngineConfig = field(default_factory=SyntheticEngineConfig)
    trtllm: TrtllmEngineConfig = field(default_factory=TrtllmEngineConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    drain_grace_seconds: float = 30.0  # in-flight calls may finish this long after SIGTERM
    health_check_interval_seconds: float = 2.0  # engine watchdog period
    warmup: bool = True  # run one generation before reporting SERVING
    max_message_bytes: int = 16 << 20
    log_level: str = "INFO"
    jobs: JobsConfig | None = None  # durable jobs; None: the Jobs API answers UNIMPLEMENTED

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
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
