"""``serve``: a thin typer layer over serving.server.serve."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from serving.compat import EngineError
from serving.config import PUBLIC_ROUTES, ServerConfig


class SequenceBatching(str, Enum):
    pad = "pad"
    bucket = "bucket"
    equal = "equal"


class Provider(str, Enum):  # not StrEnum: JetPack 6 ships Python 3.10
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


def _env(name: str) -> str:
    return f"TENSORFERRY_{name}"


def _routes(value: str) -> tuple[str, ...]:
    return tuple(p.strip().rstrip("/") for p in value.split(",") if p.strip())


def serve_command(
    engine: Annotated[
        Path,
        typer.Option(
            help="Model to serve: .onnx/.ort (onnxruntime) or .trt/.plan (TensorRT, "
            "with its .json sidecar).",
            envvar=_env("ENGINE"),
        ),
    ],
    model_name: Annotated[
        str | None,
        typer.Option(
            help="Name in URLs and metrics; default: the name the artifact records.",
            envvar=_env("MODEL_NAME"),
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.", envvar=_env("HOST"))] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to bind; 0 picks a free one.", envvar=_env("PORT"))
    ] = 8000,
    max_batch_size: Annotated[
        int, typer.Option(help="Most rows (images) per backend run.", envvar=_env("MAX_BATCH_SIZE"))
    ] = 64,
    max_queue_delay_us: Annotated[
        int,
        typer.Option(
            help="How long a request that queued behind a running batch may wait for a "
            "fuller batch (µs). Requests reaching an idle server never wait.",
            envvar=_env("MAX_QUEUE_DELAY_US"),
        ),
    ] = 100,
    max_queue_size: Annotated[
        int,
        typer.Option(
            help="Queued requests beyond which new ones get 503; 0 = unbounded.",
            envvar=_env("MAX_QUEUE_SIZE"),
        ),
    ] = 1024,
    timeout_ms: Annotated[
        int,
        typer.Option(
            help="Answer 504 to a request still queued after this long; 0 = never.",
            envvar=_env("TIMEOUT_MS"),
        ),
    ] = 0,
    provider: Annotated[
        Provider,
        typer.Option(
            help="onnxruntime execution provider (ignored for .trt plans).", envvar=_env("PROVIDER")
        ),
    ] = Provider.cpu,
    threads: Annotated[
        int,
        typer.Option(
            help="onnxruntime intra-op threads per instance; 0 = one per core, shared out "
            "among the instances.",
            envvar=_env("THREADS"),
        ),
    ] = 0,
    instances: Annotated[
        int,
        typer.Option(
            help="Model instances, each running its own batches (Triton's instance_group "
            "count); a large request is split among idle instances. On CPU, 2 instances of "
            "1 thread raise throughput for clients sending large requests; each is a copy of "
            "the model, and a single image runs on one instance's threads. "
            "See serving/README.md.",
            envvar=_env("INSTANCES"),
        ),
    ] = 1,
    flush_denormals: Annotated[
        bool | None,
        typer.Option(
            "--flush-denormals/--no-flush-denormals",
            help="Compute float32 subnormals as 0 on the threads running the model (x86 FTZ "
            "and DAZ, AArch64 FZ): models whose values underflow run at full speed on CPUs "
            "that take ~45x for them. Default: what the engine's sidecar records, off "
            "without one. See serving/README.md.",
            envvar=_env("FLUSH_DENORMALS"),
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        bool,
        typer.Option(
            "--warmup/--no-warmup",
            help="Run batch 1, the maximum and the powers of 2 between before reporting ready.",
            envvar=_env("WARMUP"),
        ),
    ] = True,
    max_request_mb: Annotated[
        float,
        typer.Option(
            help="Largest request body accepted (413 beyond).", envvar=_env("MAX_REQUEST_MB")
        ),
    ] = 64.0,
    grace_s: Annotated[
        float,
        typer.Option(
            help="On SIGTERM, how long queued requests may take to finish.", envvar=_env("GRACE_S")
        ),
    ] = 30.0,
    trt_cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where --provider tensorrt keeps its built engines (default: beside the model; "
            "set it when the model directory is read-only).",
            envvar=_env("TRT_CACHE_DIR"),
        ),
    ] = None,
    max_header_kb: Annotated[
        float,
        typer.Option(
            help="Largest request line plus headers (431 beyond).", envvar=_env("MAX_HEADER_KB")
        ),
    ] = 64.0,
    idle_timeout_s: Annotated[
        float,
        typer.Option(
            help="Close a connection whose client sent nothing for this long while owed no "
            "answer (idle keep-alive; a stalled request gets 408 first); 0 = never.",
            envvar=_env("IDLE_TIMEOUT_S"),
        ),
    ] = 60.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer <key>' on every route except --public-routes "
            "(401 otherwise). Prefer the environment variable: flags show up in ps.",
            envvar=_env("API_KEY"),
            show_default=False,
        ),
    ] = None,
    public_routes: Annotated[
        str,
        typer.Option(
            help="Comma-separated paths that need no API key.", envvar=_env("PUBLIC_ROUTES")
        ),
    ] = ",".join(PUBLIC_ROUTES),
    sequence_batching: Annotated[
        SequenceBatching,
        typer.Option(
            help="Sequence models (padded inputs in their contract): 'pad' lets requests of "
            "different lengths share a batch, each padded to the batch's longest (answers "
            "unchanged); 'bucket' the same within power-of-two length classes (1, 2, 3-4, "
            "5-8, ...); 'equal' merges equal shapes only (Triton's rule).",
            envvar=_env("SEQUENCE_BATCHING"),
        ),
    ] = SequenceBatching.bucket,
    log_level: Annotated[
        str, typer.Option(help="Python logging level.", envvar=_env("LOG_LEVEL"))
    ] = "INFO",
) -> None:
    """Serve an ONNX model or TensorRT engine over the Open Inference Protocol (v2 REST)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = ServerConfig(
            engine=engine, model_name=model_name, host=host, port=port,
            max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
            max_queue_size=max_queue_size, timeout_ms=timeout_ms, provider=provider.value,
            threads=threads, instances=instances, flush_denormals=flush_denormals,
            warmup=warmup,
            max_request_bytes=int(max_request_mb * 1024 * 1024), grace_s=grace_s,
            trt_cache_dir=trt_cache_dir,
            max_header_bytes=int(max_header_kb * 1024), idle_timeout_s=idle_timeout_s,
            api_key=api_key, public_routes=_routes(public_routes),
            sequence_batching=sequence_batching.value,
        )  # fmt: skip
        from serving.server import serve

        code = serve(config)
    except (EngineError, ValueError) as exc:
        typer.echo(f"serve: error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


app = typer.Typer(add_completion=False)
app.command()(serve_command)


def main() -> None:
    app()
