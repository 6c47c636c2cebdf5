"""TensorRT plan backend (TensorRT 10 and 11 runtime API, cuda-python for memory).

Imported only for ``.trt``/``.plan`` engines. The sidecar is checked against the host
(serving.compat) before the plan is deserialized. Written against NVIDIA's documented
runtime API; it cannot run on CPU hosts, so its tests are marked ``tensorrt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.compat import EngineError, HostInfo, check_plan, load_sidecar
from serving.contract import ContractError, ModelContract, check_io
from serving.protocol import DATATYPES, TensorSpec

_TRT_TYPES = {
    "UINT8": "UINT8",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "HALF": "FP16",
    "FLOAT": "FP32",
    "BOOL": "BOOL",
}


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


@dataclass
class TensorRTBackend:
    contract: ModelContract
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    info: dict[str, str]
    max_batch: int | None
    context: Any = field(repr=False)
    cudart: Any = field(repr=False)
    stream: Any = field(repr=False)
    buffers: dict[str, int] = field(repr=False)  # device pointers sized for max_batch
    # TensorRT requires the runtime and engine to outlive the context built from them.
    owners: tuple[Any, ...] = field(default=(), repr=False)
    platform: str = "tensorrt_plan"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        rt, name = self.cudart, self.inputs[0].name
        batch = np.ascontiguousarray(batch)
        self.context.set_input_shape(name, batch.shape)
        copy_in = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            rt.cudaMemcpyAsync(
                self.buffers[name], batch.ctypes.data, batch.nbytes, copy_in, self.stream
            )
        )
        for tensor, pointer in self.buffers.items():
            self.context.set_tensor_address(tensor, pointer)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
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


def _specs(trt: Any, engine: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = _TRT_TYPES.get(engine.get_tensor_dtype(name).name)
        if dtype is None:
            raise EngineError(
                f"engine tensor '{name}' has unsupported type {engine.get_tensor_dtype(name)}"
            )
        spec = TensorSpec(
            name, dtype, tuple(d if d > 0 else -1 for d in engine.get_tensor_shape(name))
        )
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(spec)
    return tuple(inputs), tuple(outputs)


def _allocate(cudart: Any, specs: tuple[TensorSpec, ...], rows: int) -> dict[str, int]:
    return {
        s.name: _check(
            cudart.cudaMalloc(rows * math.prod(s.shape[1:]) * DATATYPES[s.datatype].itemsize)
        )
        for s in specs
    }


def load_tensorrt(path: Path) -> TensorRTBackend:
    sidecar = load_sidecar(path)
    try:
        contract = ModelContract.from_metadata(sidecar["metadata"], source=f"{path} sidecar")
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"{path} is a TensorRT plan but tensorrt is not installed here") from None
    cudart = cuda_runtime()
    check_plan(sidecar, host_info(trt, cudart), path.name)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {path} (see its log line above)")
    inputs, outputs = _specs(trt, engine)
    try:
        check_io(contract, inputs, str(path))
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    max_batch = int(engine.get_tensor_profile_shape(inputs[0].name, 0)[2][0])
    info = {
        "backend": "tensorrt",
        "provider": "tensorrt",
        "onnxruntime_version": "",
        "tensorrt_version": trt.__version__,
        "precision": str(sidecar.get("precision", contract.precision)),
    }
    return TensorRTBackend(
        contract,
        inputs,
        outputs,
        info,
        max_batch,
        context=engine.create_execution_context(),
        cudart=cudart,
        stream=_check(cudart.cudaStreamCreate()),
        buffers=_allocate(cudart, inputs + outputs, max_batch),
        owners=(logger, runtime, engine),
    )
