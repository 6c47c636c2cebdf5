"""Model runtimes behind one small interface: onnxruntime, and TensorRT imported lazily.

The backend follows the file: ``.onnx``/``.ort`` through onnxruntime (CPU, CUDA or
TensorRT execution provider), ``.trt``/``.plan`` through the TensorRT runtime. Both read
the signature from the graph or engine itself, and the task metadata (class names,
preprocessing) from the artifact when it has any (serving/contract.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving import denormals
from serving.compat import EngineError, load_sidecar, sidecar_path
from serving.contract import (
    ContractError,
    ModelContract,
    Signature,
    TensorSpec,
    check_io,
    read_contract,
)
from serving.trt_backend import load_tensorrt

log = logging.getLogger("serving")

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _providers(provider: str, path: Path, trt_cache_dir: Path | None) -> list[Any]:
    names: list[Any] = list(_ORT_PROVIDERS[provider])
    if provider == "tensorrt":
        # Cache the built engine (beside the model unless told otherwise, e.g. for read-only
        # model mounts): an uncached TensorRT build takes minutes.
        # Without explicit profile shapes the EP widens its profile to the shapes it has
        # seen, so warm-up runs batch 1 and the maximum first.
        options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache_dir or path.parent),
            "trt_timing_cache_enable": True,
        }
        names[0] = (names[0], options)
    return names


class Backend(Protocol):
    contract: ModelContract | None  # None: a graph without tensorferry metadata
    signature: Signature
    platform: str  # Triton's platform string
    info: dict[str, str]  # backend, provider, versions, precision: the info metric's labels
    max_batch: int | None  # the most rows the engine accepts (a TensorRT profile); None: any

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for ``inputs`` (keyed by input name), keyed by output name."""
        ...

    def close(self) -> None:
        """Free what the backend holds (sessions, device memory, streams); idempotent."""
        ...


@dataclass
class OnnxRuntimeBackend:
    contract: ModelContract | None
    signature: Signature
    info: dict[str, str]
    session: Any = field(repr=False)
    platform: str = "onnxruntime_onnx"
    max_batch: int | None = None

    def __post_init__(self) -> None:
        self._output_names = [o.name for o in self.signature.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise EngineError("this onnxruntime backend has been closed")
        values = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        # onnxruntime frees the session's memory when the last reference to it goes.
        self.session = None


def _spec(node: Any, what: str) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise EngineError(f"model {what} '{node.name}' has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


def _ort_session(
    path: Path, provider: str, threads: int, trt_cache_dir: Path | None, flush: bool = False
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning intra-op threads would steal the core the event loop needs between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    with denormals.for_session(options, flush):
        try:
            return ort.InferenceSession(
                str(path), options, providers=_providers(provider, path, trt_cache_dir)
            )
        except Exception as exc:  # onnxruntime raises its own pybind types for every failure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{path} is not a loadable ONNX model: {first}") from None


def _warn_on_fallback(session: Any, provider: str) -> str:
    """Name the provider in use; onnxruntime-gpu falls back to CPU without failing."""
    wanted = _ORT_PROVIDERS[provider][0]
    active = session.get_providers()
    if active[0] != wanted:
        log.warning(
            "!!! asked for %s but onnxruntime is running on %s (active providers %s); "
            "check the CUDA/TensorRT libraries and the onnxruntime-gpu install !!!",
            wanted,
            active[0],
            active,
        )
    return active[0].removesuffix("ExecutionProvider").lower()


def _onnx_contract(session: Any, path: Path, signature: Signature) -> ModelContract | None:
    """The contract from the model's metadata (None without any), checked against the graph."""
    metadata = session.get_modelmeta().custom_metadata_map
    if not metadata and sidecar_path(path).exists():
        # ORT-format files may drop metadata_props; the sidecar carries the same keys.
        metadata = load_sidecar(path)["metadata"]
    try:
        contract = read_contract(metadata, source=str(path))
        check_io(contract, signature, str(path))
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    return contract


def load_onnxruntime(
    path: Path,
    provider: str = "cpu",
    threads: int = 0,
    trt_cache_dir: Path | None = None,
    flush_denormals: bool = False,  # its pool threads; the threads calling run flush themselves
) -> OnnxRuntimeBackend:
    import onnxruntime as ort

    session = _ort_session(path, provider, threads, trt_cache_dir, flush_denormals)
    signature = Signature.from_graph(
        tuple(_spec(node, "input") for node in session.get_inputs()),
        tuple(_spec(node, "output") for node in session.get_outputs()),
    )
    contract = _onnx_contract(session, path, signature)
    info = {
        "backend": "onnxruntime",
        "provider": _warn_on_fallback(session, provider),
        "onnxruntime_version": ort.__version__,
        "tensorrt_version": "",
        "precision": contract.precision if contract else "",
    }
    return OnnxRuntimeBackend(contract, signature, info, session)


def _load_plan(path: Path, *_onnxruntime_settings: Any) -> Backend:
    return load_tensorrt(path)  # the plan fixed its own provider, threads and engine


# Engine file suffix -> its loader, called with (path, provider, threads, trt_cache_dir,
# flush_denormals).
LOADERS: dict[str, Callable[[Path, str, int, Path | None, bool], Backend]] = {
    ".onnx": load_onnxruntime,
    ".ort": load_onnxruntime,
    ".trt": _load_plan,
    ".plan": _load_plan,
    ".engine": _load_plan,
}


def load_backend(
    path: Path,
    provider: str = "cpu",
    threads: int = 0,
    trt_cache_dir: Path | None = None,
    flush_denormals: bool = False,
) -> Backend:
    """Open the engine the way its suffix says; EngineError with one line if it can't be."""
    if not path.is_file():
        raise EngineError(f"engine file {path} does not exist")
    suffix = path.suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        raise EngineError(
            f"engine file {path} has suffix {suffix or '(none)'}; "
            f"expected one of {', '.join(LOADERS)}"
        )
    return loader(path, provider, threads, trt_cache_dir, flush_denormals)
