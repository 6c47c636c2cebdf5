"""Server settings: one frozen dataclass, filled by the CLI or by tests directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROVIDERS = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class ServerConfig:
    engine: Path
    model_name: str | None = None  # None: the name the artifact records
    host: str = "127.0.0.1"
    port: int = 8000  # 0: an ephemeral port, logged at start-up
    max_batch_size: int = 64
    max_queue_delay_us: int = 100
    max_queue_size: int = 1024  # requests; 0 = unbounded
    timeout_ms: int = 0  # queue timeout; 0 = none (a request may still set its own)
    provider: str = "cpu"
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    warmup: bool = True
    max_request_bytes: int = 64 * 1024 * 1024
    grace_s: float = 30.0
    trt_cache_dir: Path | None = None  # TensorRT EP engine cache; None: beside the model

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {self.provider}")
        for name in ("max_batch_size", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("port", "max_queue_delay_us", "max_queue_size", "timeout_ms", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
