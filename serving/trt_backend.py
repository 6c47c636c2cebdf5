"""The TensorRT plan runner (TensorRT 10 and 11 runtime API, cuda-python for memory).

The one runner for both sides: the server's backend for ``.trt``/``.plan``/``.engine`` files
(``load_tensorrt``) and the engine stage's run over the test split (``open_plan``, given the
plan it just built and its sidecar, which it stages apart). The sidecar is checked against
the host (serving.compat) before the plan is deserialized. Written against NVIDIA's
documented runtime API; it cannot run on CPU hosts, so its tests are marked ``tensorrt``.
What it decides (runtime settings from the sidecar, chunks the profile accepts) is pure and
tested on CPU, and so is its bookkeeping, with stand-ins for tensorrt and cuda-python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.compat import EngineError, HostInfo, check_plan, load_sidecar, version_compatible
from serving.contract import ContractError, ModelContract, check_io
from serving.protocol import DATATYPES, TensorSpec

# TensorRT DataType names -> protocol datatypes: what the sidecar lists for a network's I/O
# (pipeline/tensorrt_build.py) and what the runner serves. BF16 has no numpy type, so a
# plan with BF16 I/O is described but refused by the runner.
TRT_DATATYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
}

Outputs = dict[str, np.ndarray]


def cuda_runtime() -> Any:
    """cuda-python's runtime module (its import path moved in 12.6)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise EngineError(
                "TensorRT engines need cuda-python: pip install cuda-python"
            ) from None
    return runtime


def _check(result: Any) -> Any:
    """cuda-python returns (error, *values); turn a non-zero error into EngineError."""
    error, *values = result
    if int(error) != 0:
        raise EngineError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def host_info(trt: Any, cudart: Any) -> HostInfo:
    device = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(device))
    name = (
        props.name.decode(errors="replace").rstrip("\x00")
        if isinstance(props.name, bytes)
        else str(props.name)
    )
    return HostInfo(trt.__version__, name, f"{props.major}.{props.minor}")


def host_code_allowed(sidecar: Mapping[str, Any]) -> bool:
    """Whether the runtime may run code the plan carries: only a version-compatible plan's.

    Such a plan embeds a lean runtime that TensorRT loads from it to deserialize and run
    the rest, and TensorRT refuses unless told the plan is trusted ("Version Compatibility",
    docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/version-compatibility.html).
    Any other plan needs no host code, so it gets no permission to run any.
    """
    return version_compatible(sidecar)


def run_in_profile(
    run: Callable[[np.ndarray], Outputs], batch: np.ndarray, min_batch: int, max_batch: int
) -> Outputs:
    """``run`` over every row of ``batch`` through a profile taking min_batch..max_batch rows.

    Chunks of at most ``max_batch`` rows; one shorter than ``min_batch`` is padded with
    copies of its last row, whose outputs are dropped.
    """
    if not len(batch):
        raise EngineError("a TensorRT engine cannot run an empty batch")
    parts = []
    for start in range(0, len(batch), max_batch):
        chunk = batch[start : start + max_batch]
        rows = len(chunk)
        if rows < min_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], min_batch - rows, axis=0)])
        parts.append({name: value[:rows] for name, value in run(chunk).items()})
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


@dataclass
class TensorRTBackend:
    contract: ModelContract
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    info: dict[str, str]
    min_batch: int  # the optimisation profile's batch range
    max_batch: int
    context: Any = field(repr=False)
    cudart: Any = field(repr=False)
    stream: Any = field(repr=False)
    buffers: dict[str, int] = field(repr=False)  # device pointers sized for max_batch
    # TensorRT needs the runtime and engine to outlive the context built from them (and the
    # logger to outlive all three), so they are held here and released last.
    engine: Any = field(repr=False)
    runtime: Any = field(repr=False)
    logger: Any = field(repr=False)
    platform: str = "tensorrt_plan"
    closed: bool = False

    def run(self, batch: np.ndarray) -> Outputs:
        """Outputs for every row of ``batch``, in runs the profile accepts."""
        if self.closed:
            raise EngineError("this TensorRT engine has been closed")
        return run_in_profile(self._run_once, batch, self.min_batch, self.max_batch)

    def _run_once(self, batch: np.ndarray) -> Outputs:
        rt, name = self.cudart, self.inputs[0].name
        batch = np.ascontiguousarray(batch)
        if not self.context.set_input_shape(name, batch.shape):
            raise EngineError(f"TensorRT refused input shape {list(batch.shape)}")
        copy_in = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            rt.cudaMemcpyAsync(
                self.buffers[name], batch.ctypes.data, batch.nbytes, copy_in, self.stream
            )
        )
        for tensor, pointer in self.buffers.items():
            self.context.set_tensor_address(tensor, pointer)
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT execute_async_v3 failed")
        results = {}
        copy_out = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.outputs:
            host = np.empty(
                tuple(self.context.get_tensor_shape(spec.name)), DATATYPES[spec.datatype]
            )
            _check(
                rt.cudaMemcpyAsync(
                    host.ctypes.data, self.buffers[spec.name], host.nbytes, copy_out, self.stream
                )
            )
            results[spec.name] = host
        _check(rt.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        """Free the device buffers and the stream, then the context, engine and runtime.

        Idempotent. Every release is tried; a CUDA error among them is raised afterwards.
        """
        if self.closed:
            return
        self.closed = True
        rt, buffers = self.cudart, self.buffers
        self.buffers = {}
        # Nothing still queued on the stream may use the memory freed below.
        results = [rt.cudaStreamSynchronize(self.stream)]
        results += [rt.cudaFree(pointer) for pointer in buffers.values()]
        results.append(rt.cudaStreamDestroy(self.stream))
        self.context = None  # reverse order of creation
        self.engine = None
        self.runtime = None
        self.logger = None
        failed = [error for error, *_ in results if int(error) != 0]
        if failed:
            raise EngineError(f"CUDA call failed while closing the TensorRT engine: {failed[0]}")


def _specs(trt: Any, engine: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = TRT_DATATYPES.get(engine.get_tensor_dtype(name).name)
        if dtype not in DATATYPES:
            raise EngineError(
                f"engine tensor '{name}' has unsupported type {engine.get_tensor_dtype(name)}"
            )
        spec = TensorSpec(
            name, dtype, tuple(d if d > 0 else -1 for d in engine.get_tensor_shape(name))
        )
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(spec)
    return tuple(inputs), tuple(outputs)


def _nbytes(spec: TensorSpec, rows: int) -> int:
    return rows * math.prod(spec.shape[1:]) * DATATYPES[spec.datatype].itemsize


def open_plan(plan: bytes, sidecar: Mapping[str, Any], source: Path) -> TensorRTBackend:
    """A runner for ``plan``, whose sidecar (``<plan>.json``) holds ``sidecar``.

    ``source`` names the plan in messages. EngineError with one line if this host can't run
    it; the sidecar is checked against the host before the plan is deserialized.
    """
    try:
        contract = ModelContract.from_metadata(sidecar["metadata"], source=f"{source} sidecar")
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(
            f"{source} is a TensorRT plan but tensorrt is not installed here"
        ) from None
    cudart = cuda_runtime()
    check_plan(sidecar, host_info(trt, cudart), source.name)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = host_code_allowed(sidecar)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {source} (see its log line above)")
    inputs, outputs = _specs(trt, engine)
    try:
        check_io(contract, inputs, str(source))
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    context = engine.create_execution_context()
    if context is None:
        raise EngineError(f"TensorRT could not create an execution context for {source}")
    batches = engine.get_tensor_profile_shape(inputs[0].name, 0)  # [min, opt, max] of profile 0
    info = {
        "backend": "tensorrt",
        "provider": "tensorrt",
        "onnxruntime_version": "",
        "tensorrt_version": trt.__version__,
        "precision": str(sidecar.get("precision", contract.precision)),
    }
    backend = TensorRTBackend(
        contract,
        inputs,
        outputs,
        info,
        min_batch=int(batches[0][0]),
        max_batch=int(batches[2][0]),
        context=context,
        cudart=cudart,
        stream=_check(cudart.cudaStreamCreate()),
        buffers={},
        engine=engine,
        runtime=runtime,
        logger=logger,
    )
    try:
        for spec in inputs + outputs:
            backend.buffers[spec.name] = _check(cudart.cudaMalloc(_nbytes(spec, backend.max_batch)))
    except EngineError:
        backend.close()  # out of device memory: give back the stream and what was allocated
        raise
    return backend


def load_tensorrt(path: Path) -> TensorRTBackend:
    """The server's backend for a plan file with its sidecar beside it."""
    sidecar = load_sidecar(path)
    return open_plan(path.read_bytes(), sidecar, path)
