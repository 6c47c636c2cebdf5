"""Can this host run that TensorRT plan? Decided from the sidecar before deserializing.

A plan runs only on the TensorRT version and GPU compute capability that built it
(unless built version- or hardware-compatible); TensorRT's own errors for a mismatch
("Version tag does not match", "expecting compute 8.6 got compute 7.5") come late and
cryptic, so we compare the sidecar with the host first and say what was built where.
Pure Python: tested on CPU with hand-written sidecars.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.contract import SIDECAR_SUFFIX


class EngineError(RuntimeError):
    """The engine file cannot be served on this host; the message is one line for the user."""


@dataclass(frozen=True)
class HostInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.6"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def load_sidecar(engine: Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{engine} has no sidecar {path.name}; rebuild it with the engine stage"
        ) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"sidecar {path} is unreadable: {exc}") from exc
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("metadata"), dict):
        raise EngineError(f"sidecar {path} lacks its 'metadata' object")
    return sidecar


def version_compatible(sidecar: Mapping[str, Any]) -> bool:
    """Built with BuilderFlag.VERSION_COMPATIBLE: the plan embeds a lean TensorRT runtime."""
    return sidecar.get("version_compatible") is True


def _version(text: str, parts: int) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split(".")[:parts])
    except ValueError:
        raise EngineError(f"unparseable version {text!r}") from None


def _same_tensorrt(built: str, host: str, version_compatible: bool) -> bool:
    if version_compatible:
        # A version-compatible plan embeds a lean runtime: it runs forward, never backward.
        return _version(host, 1) == _version(built, 1) and _version(host, 3) >= _version(built, 3)
    return _version(host, 3) == _version(built, 3)


def _same_gpu(built: str, host: str, hardware_level: str) -> bool:
    if hardware_level.lower() in ("ampere_plus", "ampereplus", "ampere+"):
        return _version(host, 2) >= (8, 0)
    return _version(host, 2) == _version(built, 2)


def check_plan(sidecar: Mapping[str, Any], host: HostInfo, engine_name: str = "engine") -> None:
    """Raise EngineError with one line if the plan was built for another TensorRT or GPU."""
    if sidecar.get("format", "tensorrt") != "tensorrt":
        raise EngineError(
            f"{engine_name} sidecar says format {sidecar.get('format')!r}, not tensorrt"
        )
    missing = [k for k in ("tensorrt_version", "compute_capability") if not sidecar.get(k)]
    if missing:
        raise EngineError(f"{engine_name} sidecar lacks {', '.join(missing)}; rebuild the engine")
    built_trt = str(sidecar["tensorrt_version"])
    built_cc = str(sidecar["compute_capability"])
    trt_ok = _same_tensorrt(built_trt, host.tensorrt_version, version_compatible(sidecar))
    gpu_ok = _same_gpu(
        built_cc, host.compute_capability, str(sidecar.get("hardware_compatibility", ""))
    )
    if trt_ok and gpu_ok:
        return
    built_on = sidecar.get("gpu_name") or "an unnamed GPU"
    raise EngineError(
        f"{engine_name} was built with TensorRT {built_trt} on {built_on} (compute {built_cc}) "
        f"but this host has TensorRT {host.tensorrt_version} on {host.gpu_name} "
        f"(compute {host.compute_capability}); rebuild the engine on this host"
    )
