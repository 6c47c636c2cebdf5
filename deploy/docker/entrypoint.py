"""Container entrypoint: check the model path, build a TensorRT plan if asked, exec ``serve``.

Every image runs ``entrypoint.py [serve flags]``. It reads ``--engine`` (or
``TENSORFERRY_ENGINE``) the way ``serve`` does and:

- fails with one line and exit 2 when the model file is missing (the usual mistake: the
  volume was not mounted at /models);
- given an ``.onnx`` and ``TENSORFERRY_ENGINE_CACHE`` (a writable directory), builds a
  TensorRT plan with ``trtexec`` once per model, GPU and TensorRT version, writes its
  sidecar, and serves the plan. A plan runs only where it was built, so the cache key
  holds the GPU (name and compute capability, read through cuda-python exactly as
  ``serve`` reads them for its compatibility check) and the TensorRT version;
- otherwise changes nothing.

Then it ``exec``s ``python -m serving`` (the ``serve`` command): serve becomes PID 1,
receives the container's SIGTERM, and its exit status is the container's, so an engine
built for another GPU or TensorRT fails start-up with serve's one-line message and 2.
The images ship ``serving`` but not ``pipeline``: hence trtexec, not ``tensorferry engine``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROG = "tensorferry-entrypoint"
CACHE_ENV = "TENSORFERRY_ENGINE_CACHE"
DEFAULT_MAX_BATCH = 64  # serve's --max-batch-size default (a test keeps them equal)
WORKSPACE_MIB = 1024
# trtexec ships in NVIDIA's TensorRT images under one of these when it is not on PATH.
TRTEXEC_DIRS = ("/usr/src/tensorrt/bin", "/opt/tensorrt/bin", "/workspace/tensorrt/bin")


class EntrypointError(RuntimeError):
    """Start-up cannot go on; the message is one line for the container log."""


def option(args: Sequence[str], flag: str, env: Mapping[str, str], envvar: str) -> str | None:
    """A serve option's value as serve will see it: the last flag wins, then the variable."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value if value is not None else env.get(envvar)


def replace_engine(args: Sequence[str], engine: Path) -> list[str]:
    """``args`` with every ``--engine`` dropped and ``--engine ENGINE`` appended."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--engine":
            skip = True
        elif not arg.startswith("--engine="):
            out.append(arg)
    return [*out, "--engine", str(engine)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def host_identity() -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability) as serve's compatibility check sees them."""
    try:
        import tensorrt
    except ImportError:
        raise EntrypointError(
            f"{CACHE_ENV} is set but tensorrt is not importable: building a plan needs the GPU "
            "image; unset it to serve the ONNX through onnxruntime"
        ) from None
    from serving.compat import EngineError
    from serving.trt_backend import cuda_runtime, host_info

    try:
        host = host_info(tensorrt, cuda_runtime())
    except EngineError as exc:
        raise EntrypointError(f"cannot query the GPU: {exc}") from None
    return host.tensorrt_version, host.gpu_name, host.compute_capability


def cache_key(onnx_sha256: str, precision: str, max_batch: int, host: tuple[str, str, str]) -> str:
    version, gpu, capability = host
    return (
        f"{onnx_sha256[:16]}-{precision}-b{max_batch}"
        f"-{_slug(gpu)}-sm{capability.replace('.', '')}-trt{version}"
    )


def find_trtexec(env: Mapping[str, str]) -> str:
    search = os.pathsep.join([env.get("PATH", ""), *TRTEXEC_DIRS])
    found = shutil.which("trtexec", path=search)
    if found is None:
        raise EntrypointError(
            f"trtexec not found on PATH or in {', '.join(TRTEXEC_DIRS)}; "
            f"use NVIDIA's TensorRT image or unset {CACHE_ENV}"
        )
    return found


def _shapes(signature: Any, batch: int) -> str:
    """trtexec's shape list for every input at ``batch`` rows."""
    return ",".join(
        f"{s.name}:" + "x".join(map(str, (batch, *s.shape[1:]))) for s in signature.inputs
    )


def trtexec_command(
    trtexec: str,
    onnx: Path,
    plan: Path,
    backend: Any,
    max_batch: int,
    version: str,
    timing: Path,
) -> list[str]:
    """The pipeline's engine build (pipeline/tensorrt_build.py) in trtexec's terms."""
    signature = backend.signature
    dims = [d for s in signature.inputs for d in s.shape[1 if signature.batching else 0 :]]
    if -1 in dims:
        raise EntrypointError(
            f"{onnx} has dynamic dims besides the batch ({signature.describe()}): its "
            "TensorRT profile needs their ranges; build the plan with trtexec "
            "--minShapes/--optShapes/--maxShapes and serve the .plan"
        )
    command = [
        trtexec,
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--memPoolSize=workspace:{WORKSPACE_MIB}",
        f"--timingCacheFile={timing}",
    ]
    if signature.batching:
        opt = min(32, max_batch)  # the engine stage's default opt_batch
        command[3:3] = [
            f"--minShapes={_shapes(signature, 1)}",
            f"--optShapes={_shapes(signature, opt)}",
            f"--maxShapes={_shapes(signature, max_batch)}",
        ]
    # TensorRT 10 is weakly typed: precision needs a flag. 11 removed the flags and takes
    # the precision from the (fp16 or Q/DQ int8) ONNX itself.
    precision = backend.info["precision"]
    if int(version.split(".")[0]) < 11 and precision in ("fp16", "int8"):
        command.append(f"--{precision}")
    return command


def make_sidecar(backend: Any, onnx: Path, sha256: str, max_batch: int, host: tuple) -> dict:
    """The sidecar serve needs for a plan (serving/contract.py, serving/compat.py)."""
    version, gpu, capability = host
    contract, signature = backend.contract, backend.signature
    first = signature.inputs[0].shape[1:]

    def io(specs: Any) -> list[dict[str, Any]]:
        return [{"name": s.name, "dtype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {
        "format": "tensorrt",
        "metadata": contract.to_metadata() if contract else {},
        "class_names": list(contract.class_names) if contract else [],
        "precision": backend.info["precision"],
        "tensorrt_version": version,
        "gpu_name": gpu,
        "compute_capability": capability,
        "hardware_compatibility": "none",
        "version_compatible": False,
        "profile": {  # the first input's
            "min": [1, *first],
            "opt": [min(32, max_batch), *first],
            "max": [max_batch, *first],
        },
        "inputs": io(signature.inputs),
        "outputs": io(signature.outputs),
        "onnx_file": onnx.name,
        "onnx_sha256": sha256,
        "built_by": "deploy/docker/entrypoint.py (trtexec)",
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_plan(onnx: Path, cache: Path, max_batch: int, env: Mapping[str, str]) -> Path:
    """The plan for ``onnx`` on this GPU and TensorRT: reused from ``cache``, else built there."""
    from serving.backends import load_backend
    from serving.compat import EngineError

    try:  # the server's own reader: a model it would refuse fails before a long build
        backend = load_backend(onnx, "cpu", 1)
    except EngineError as exc:
        raise EntrypointError(str(exc)) from None
    host = host_identity()
    sha = _sha256(onnx)
    plan = (
        cache
        / f"{onnx.stem}-{cache_key(sha, backend.info['precision'] or 'fp32', max_batch, host)}.trt"
    )
    sidecar = plan.with_name(plan.name + ".json")
    if plan.is_file() and sidecar.is_file():
        print(f"{PROG}: reusing {plan}", file=sys.stderr)
        return plan
    version, gpu, capability = host
    timing = cache / f"timing-{_slug(gpu)}-sm{capability.replace('.', '')}-trt{version}.cache"
    partial = plan.with_name(f".{plan.name}.{os.getpid()}")
    command = trtexec_command(find_trtexec(env), onnx, partial, backend, max_batch, version, timing)
    print(f"{PROG}: building {plan.name} (minutes on first start): {' '.join(command)}",
          file=sys.stderr)  # fmt: skip
    result = subprocess.run(command, stdout=sys.stderr, env=dict(env), check=False)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise EntrypointError(f"trtexec failed (exit {result.returncode}) building {onnx}")
    # Written under temporary names and renamed: replicas sharing the cache never see half a plan.
    tmp_sidecar = sidecar.with_name(f".{sidecar.name}.{os.getpid()}")
    tmp_sidecar.write_text(json.dumps(make_sidecar(backend, onnx, sha, max_batch, host), indent=2))
    partial.replace(plan)
    tmp_sidecar.replace(sidecar)
    return plan


def serve_args(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The arguments to exec serve with; EntrypointError when start-up cannot go on."""
    value = option(args, "--engine", env, "TENSORFERRY_ENGINE")
    if value is None:
        return list(args)  # serve itself says the option is missing
    engine = Path(value)
    if not engine.is_file():
        raise EntrypointError(
            f"model file {engine} does not exist; mount the model directory "
            f'(docker run -v "$PWD/models:/models:ro" ...) or set --engine'
        )
    cache = env.get(CACHE_ENV)
    if engine.suffix.lower() != ".onnx" or not cache:
        return list(args)
    cache_dir = Path(cache)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EntrypointError(f"{CACHE_ENV}={cache} cannot be created: {exc}") from None
    if not os.access(cache_dir, os.W_OK):
        raise EntrypointError(f"{CACHE_ENV}={cache} is not writable by uid {os.getuid()}")
    batch = option(args, "--max-batch-size", env, "TENSORFERRY_MAX_BATCH_SIZE")
    plan = cached_plan(engine, cache_dir, int(batch or DEFAULT_MAX_BATCH), env)
    return replace_engine(args, plan)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        final = serve_args(args, os.environ)
    except (EntrypointError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "serving", *final])


if __name__ == "__main__":
    main()
