"""Server settings: one frozen dataclass, filled by the CLI or by tests directly."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PROVIDERS = ("cpu", "cuda", "tensorrt")
# How requests of a sequence model (padded inputs in its contract) batch: "pad" merges
# different lengths, padded to the longest in the batch; "bucket" the same within
# power-of-two length classes; "equal" only equal shapes (Triton's rule).
SEQUENCE_BATCHING = ("pad", "bucket", "equal")
# Routes a load balancer or Prometheus must reach without the API key.
PUBLIC_ROUTES = ("/v2/health/live", "/v2/health/ready", "/metrics")
# Model names appear in URLs and metric labels; nothing maps them to files, and this keeps
# them from ever looking like paths.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


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
    threads: int = 0  # onnxruntime intra-op threads per instance; 0 = one per core in all
    instances: int = 1  # model instances (sessions), each with its own worker thread
    # Subnormals as 0 on the threads running the model; None: what the engine sidecar
    # records (the setting its accuracy was measured with), off without one.
    flush_denormals: bool | None = None
    warmup: bool = True
    max_request_bytes: int = 64 * 1024 * 1024
    grace_s: float = 30.0
    trt_cache_dir: Path | None = None  # TensorRT EP engine cache; None: beside the model
    max_header_bytes: int = 64 * 1024  # request line + headers (431 beyond)
    idle_timeout_s: float = 60.0  # client silent this long while owed nothing: close; 0 = never
    # Bearer token required on every route except public_routes; kept out of repr and logs.
    api_key: str | None = field(default=None, repr=False)
    public_routes: tuple[str, ...] = PUBLIC_ROUTES
    sequence_batching: str = "bucket"  # one of SEQUENCE_BATCHING

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {self.provider}")
        if self.sequence_batching not in SEQUENCE_BATCHING:
            raise ValueError(
                f"sequence_batching must be one of {', '.join(SEQUENCE_BATCHING)}, "
                f"not {self.sequence_batching}"
            )
        if self.model_name is not None and not MODEL_NAME.fullmatch(self.model_name):
            raise ValueError(
                f"model name {self.model_name!r} must be 1-128 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; leave it unset to turn auth off")
        for name in ("max_batch_size", "max_request_bytes", "max_header_bytes", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "port", "max_queue_delay_us", "max_queue_size", "timeout_ms", "threads",
            "idle_timeout_s",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
