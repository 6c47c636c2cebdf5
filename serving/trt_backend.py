"""The TensorRT plan runner (TensorRT 10 and 11 runtime API, cuda-python for memory).

The one runner for both sides: the server's backend for ``.trt``/``.plan``/``.engine`` files
(``load_tensorrt``) and the engine stage's run over the test split (``open_plan``, given the
plan it just built and its sidecar, which it stages apart).

Any plan is served from the engine's own I/O tensors (its signature: names, dtypes, shapes
with -1 for a dynamic dim, any number of inputs and outputs) and optimisation profile 0.
A plan with a sidecar (``<plan>.json``, written by the engine stage) is checked against the
host (serving.compat) before it is deserialized and carries a contract (task metadata); a
plan without one (a user's ``trtexec --saveEngine`` output) is deserialized as it is, so a
mismatch is reported by TensorRT's own error, and is served with no contract.

Written against NVIDIA's documented runtime API; it cannot run on CPU hosts, so its real
tests are marked ``tensorrt``. What it decides (runtime settings from the sidecar, chunks
the profile accepts, buffer sizes) is pure or tested on CPU with stand-ins for tensorrt and
cuda-python (tests/serving/trt_stand_ins.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.compat import (
    EngineError,
    HostInfo,
    check_plan,
    load_sidecar,
    sidecar_path,
    version_compatible,
)
from serving.contract import (
    ContractError,
    ModelContract,
    Signature,
    TensorSpec,
    check_io,
    read_contract,
)
from serving.protocol import DATATYPES

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

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Shape = tuple[int, ...]


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


def host_code_allowed(sidecar: Mapping[str, Any] | None) -> bool:
    """Whether the runtime may run code the plan carries: only a version-compatible plan's.

    Such a plan embeds a lean runtime that TensorRT loads from it to deserialize and run
    the rest, and TensorRT refuses unless told the plan is trusted ("Version Compatibility",
    docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/version-compatibility.html).
    Any other plan needs no host code, so it gets no permission to run any; nor does a plan
    without a sidecar, which nothing vouches for (give it a sidecar to trust it).
    """
    return sidecar is not None and version_compatible(sidecar)


def run_in_profile(
    run: Callable[[Inputs], Outputs], inputs: Inputs, min_batch: int, max_batch: int
) -> Outputs:
    """``run`` over every row of ``inputs`` through a profile taking min_batch..max_batch rows.

    Every input is cut into the same chunks of at most ``max_batch`` rows; a chunk shorter
    than ``min_batch`` is padded with copies of its last row in every input, and the padded
    rows are dropped from every output.
    """
    total = _rows(inputs)
    parts = []
    for start in range(0, total, max_batch):
        rows = min(max_batch, total - start)
        chunk = {name: value[start : start + rows] for name, value in inputs.items()}
        if rows < min_batch:
            chunk = {name: _pad(value, min_batch) for name, value in chunk.items()}
        parts.append({name: value[:rows] for name, value in run(chunk).items()})
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _rows(inputs: Inputs) -> int:
    rows = {name: len(value) for name, value in inputs.items()}
    if len(set(rows.values())) > 1:
        raise EngineError(f"inputs have different batch sizes: {rows}")
    total = next(iter(rows.values()), 0)
    if not total:
        raise EngineError("a TensorRT engine cannot run an empty batch")
    return total


def _pad(value: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([value, np.repeat(value[-1:], rows - len(value), axis=0)])


def check_inputs(signature: Signature, inputs: Inputs) -> None:
    """``inputs`` must be exactly the engine's, each of its dtype and rank: nothing is cast."""
    names = [spec.name for spec in signature.inputs]
    if not isinstance(inputs, Mapping):
        raise EngineError(f"run takes a dict of arrays keyed by input name ({names})")
    if set(inputs) != set(names):
        missing = [name for name in names if name not in inputs]
        unexpected = sorted(set(inputs) - set(names))
        raise EngineError(
            f"the engine takes inputs {names}; missing {missing}, unexpected {unexpected}"
        )
    for spec in signature.inputs:
        value, dtype = inputs[spec.name], DATATYPES[spec.datatype]
        if not isinstance(value, np.ndarray) or value.dtype != dtype:
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise EngineError(f"input '{spec.name}' is {got}; the engine takes {spec.datatype}")
        fits = value.ndim == len(spec.shape) and all(
            want in (-1, dim) for want, dim in zip(spec.shape, value.shape, strict=False)
        )
        if not fits:
            raise EngineError(
                f"input '{spec.name}' has shape {list(value.shape)}; "
                f"the engine takes {list(spec.shape)}"
            )


@dataclass
class TensorRTBackend:
    contract: ModelContract | None  # None: a plan without a sidecar
    signature: Signature
    info: dict[str, str]
    min_batch: int | None  # profile 0's batch range, for batching engines; None otherwise
    max_batch: int | None
    limits: dict[str, tuple[Shape, Shape]] = field(repr=False)  # input -> profile min, max
    context: Any = field(repr=False)
    cudart: Any = field(repr=False)
    stream: Any = field(repr=False)
    buffers: dict[str, int] = field(repr=False)  # tensor -> device pointer
    capacity: dict[str, int] = field(repr=False)  # tensor -> bytes at that pointer
    # TensorRT needs the runtime and engine to outlive the context built from them (and the
    # logger to outlive all three), so they are held here and released last.
    engine: Any = field(repr=False)
    runtime: Any = field(repr=False)
    logger: Any = field(repr=False)
    platform: str = "tensorrt_plan"
    closed: bool = False

    def run(self, inputs: Inputs) -> Outputs:
        """Every output for ``inputs`` (keyed by name); a batching engine's in runs its
        profile accepts, any other's in one run of the shapes given."""
        if self.closed:
            raise EngineError("this TensorRT engine has been closed")
        check_inputs(self.signature, inputs)
        if self.min_batch is None or self.max_batch is None:
            return self._run_once(inputs)
        return run_in_profile(self._run_once, inputs, self.min_batch, self.max_batch)

    def _run_once(self, inputs: Inputs) -> Outputs:
        # The host arrays are kept until the stream is synchronised: the copies are async.
        staged = [self._copy_in(spec, inputs[spec.name]) for spec in self.signature.inputs]
        for tensor, pointer in self.buffers.items():
            if not self.context.set_tensor_address(tensor, pointer):
                raise EngineError(f"TensorRT refused the address of tensor '{tensor}'")
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT execute_async_v3 failed")
        results = {spec.name: self._copy_out(spec) for spec in self.signature.outputs}
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        del staged
        return results

    def _copy_in(self, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
        value = np.ascontiguousarray(value)
        shape = tuple(int(d) for d in value.shape)
        fits = value.nbytes <= self.capacity[spec.name]
        if not (fits and self.context.set_input_shape(spec.name, shape)):
            low, high = self.limits[spec.name]
            raise EngineError(
                f"TensorRT refused input '{spec.name}' shape {list(shape)}; "
                f"its profile takes {list(low)} to {list(high)}"
            )
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            self.cudart.cudaMemcpyAsync(
                self.buffers[spec.name], value.ctypes.data, value.nbytes, kind, self.stream
            )
        )
        return value

    def _copy_out(self, spec: TensorSpec) -> np.ndarray:
        shape = _dims(self.context.get_tensor_shape(spec.name))
        dtype = DATATYPES[spec.datatype]
        if min(shape, default=0) < 0 or _nbytes(shape, dtype) > self.capacity[spec.name]:
            raise EngineError(
                f"TensorRT output '{spec.name}' has shape {list(shape)}, beyond the "
                f"{self.capacity[spec.name]} bytes allocated for it at the largest inputs"
            )
        host = np.empty(shape, dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            self.cudart.cudaMemcpyAsync(
                host.ctypes.data, self.buffers[spec.name], host.nbytes, kind, self.stream
            )
        )
        return host

    def close(self) -> None:
        """Free the device buffers and the stream, then the context, engine and runtime.

        Idempotent. Every release is tried; a CUDA error among them is raised afterwards.
        """
        if self.closed:
            return
        self.closed = True
        rt, buffers = self.cudart, self.buffers
        self.buffers, self.capacity = {}, {}
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


def _dims(dims: Any) -> Shape:
    return tuple(int(d) for d in dims)


def _nbytes(shape: Shape, dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def engine_signature(trt: Any, engine: Any) -> Signature:
    """The engine's I/O tensors, in its order; batching iff every first dim is dynamic."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = TRT_DATATYPES.get(engine.get_tensor_dtype(name).name)
        if dtype not in DATATYPES:
            raise EngineError(
                f"engine tensor '{name}' has unsupported type {engine.get_tensor_dtype(name)}"
            )
        shape = tuple(d if d >= 0 else -1 for d in _dims(engine.get_tensor_shape(name)))
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(TensorSpec(name, dtype, shape))
    return Signature.from_graph(tuple(inputs), tuple(outputs))


def input_limits(engine: Any, signature: Signature) -> dict[str, tuple[Shape, Shape]]:
    """Each input's smallest and largest shape: profile 0's min and max for one with a
    dynamic dim (a context runs profile 0 unless told otherwise), else its fixed shape."""
    limits = {}
    for spec in signature.inputs:
        if -1 in spec.shape:
            low, _opt, high = engine.get_tensor_profile_shape(spec.name, 0)
            limits[spec.name] = (_dims(low), _dims(high))
        else:
            limits[spec.name] = (spec.shape, spec.shape)
    return limits


def batch_range(
    signature: Signature, limits: Mapping[str, tuple[Shape, Shape]]
) -> tuple[int, int] | None:
    """The rows every input accepts at once (the tightest first-dim range over the
    inputs), for a batching engine; None for one without a batch dim."""
    if not signature.batching or not signature.inputs:
        return None
    low = max(limits[spec.name][0][0] for spec in signature.inputs)
    high = min(limits[spec.name][1][0] for spec in signature.inputs)
    if low > high:
        ranges = {name: f"{lo[0]}..{hi[0]}" for name, (lo, hi) in limits.items()}
        raise EngineError(f"the inputs' batch ranges in profile 0 share no size: {ranges}")
    return low, high


def largest_inputs(
    limits: Mapping[str, tuple[Shape, Shape]], batches: tuple[int, int] | None
) -> dict[str, Shape]:
    """The largest shape the runner gives each input: its profile max, with the batch dim
    of a batching engine at the most rows every input takes (it never sends more)."""
    if batches is None:
        return {name: high for name, (_low, high) in limits.items()}
    return {name: (batches[1], *high[1:]) for name, (_low, high) in limits.items()}


def max_shapes(
    context: Any, signature: Signature, largest: Mapping[str, Shape], source: Path
) -> dict[str, Shape]:
    """The shape of every tensor with every input at its ``largest``, to size the buffers.

    An engine describes its outputs only with -1s for what depends on its inputs, and a
    context resolves them only for input shapes it has been given, so each output is sized
    by what the context reports with every input set to its largest: the largest output for
    networks whose output dims grow with their inputs' (ours, and what NVIDIA's
    samples/python/common_runtime.py allocate_buffers assumes too). Each run checks the
    resolved output fits its buffer, so any other network fails loudly, never overruns.
    """
    for spec in signature.inputs:
        if not context.set_input_shape(spec.name, largest[spec.name]):
            shape = list(largest[spec.name])
            raise EngineError(f"TensorRT refused {source} input '{spec.name}' shape {shape}")
    try:
        unresolved = context.infer_shapes()
    except RuntimeError as exc:
        raise EngineError(f"TensorRT could not infer {source}'s output shapes: {exc}") from None
    if unresolved:
        raise EngineError(
            f"{source} needs the values, not only the shapes, of {list(unresolved)} to know "
            "its output shapes; shape-tensor inputs are not supported"
        )
    shapes = dict(largest)
    for spec in signature.outputs:
        shape = _dims(context.get_tensor_shape(spec.name))
        if min(shape, default=0) < 0:
            raise EngineError(
                f"{source} output '{spec.name}' has a data-dependent shape {list(shape)}; "
                "this runner sizes outputs from input shapes"
            )
        shapes[spec.name] = shape
    return shapes


def _sidecar_contract(sidecar: Mapping[str, Any] | None, source: Path) -> ModelContract | None:
    if sidecar is None:
        return None
    metadata = sidecar.get("metadata")
    if not isinstance(metadata, Mapping):
        raise EngineError(f"{source} sidecar lacks its 'metadata' object")
    try:
        return read_contract(metadata, f"{source} sidecar")
    except ContractError as exc:
        raise EngineError(str(exc)) from None


def _import_tensorrt(source: Path) -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(
            f"{source} is a TensorRT plan but tensorrt is not installed here"
        ) from None
    return trt


def _deserialize(
    trt: Any, cudart: Any, plan: bytes, sidecar: Mapping[str, Any] | None, source: Path
) -> tuple[Any, Any, Any]:
    """(logger, runtime, engine); refused before deserializing if the sidecar says the plan
    was built for another TensorRT or GPU. Without a sidecar, TensorRT's error is all."""
    if sidecar is not None:
        check_plan(sidecar, host_info(trt, cudart), source.name)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = host_code_allowed(sidecar)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {source} (see its log line above)")
    return logger, runtime, engine


def _info(
    trt: Any, sidecar: Mapping[str, Any] | None, contract: ModelContract | None
) -> dict[str, str]:
    precision = "" if sidecar is None else sidecar.get("precision", "")
    return {
        "backend": "tensorrt",
        "provider": "tensorrt",
        "onnxruntime_version": "",
        "tensorrt_version": trt.__version__,
        "precision": str(precision or (contract.precision if contract else "")),
    }


def open_plan(plan: bytes, sidecar: Mapping[str, Any] | None, source: Path) -> TensorRTBackend:
    """A runner for ``plan``, whose sidecar (``<plan>.json``) holds ``sidecar``, or None
    for a plan without one (served from the engine alone, with no contract).

    ``source`` names the plan in messages. EngineError with one line if this host can't run
    it; a sidecar is checked against the host before the plan is deserialized.
    """
    contract = _sidecar_contract(sidecar, source)
    trt, cudart = _import_tensorrt(source), cuda_runtime()
    logger, runtime, engine = _deserialize(trt, cudart, plan, sidecar, source)
    signature = engine_signature(trt, engine)
    try:
        check_io(contract, signature, str(source))
    except ContractError as exc:
        raise EngineError(str(exc)) from None
    context = engine.create_execution_context()
    if context is None:
        raise EngineError(f"TensorRT could not create an execution context for {source}")
    limits = input_limits(engine, signature)
    batches = batch_range(signature, limits)
    shapes = max_shapes(context, signature, largest_inputs(limits, batches), source)
    backend = TensorRTBackend(
        contract,
        signature,
        _info(trt, sidecar, contract),
        min_batch=None if batches is None else batches[0],
        max_batch=None if batches is None else batches[1],
        limits=limits,
        context=context,
        cudart=cudart,
        stream=_check(cudart.cudaStreamCreate()),
        buffers={},
        capacity={},
        engine=engine,
        runtime=runtime,
        logger=logger,
    )
    _allocate(backend, signature, shapes)
    return backend


def _allocate(backend: TensorRTBackend, signature: Signature, shapes: Mapping[str, Shape]):
    try:
        for spec in signature.inputs + signature.outputs:
            nbytes = _nbytes(shapes[spec.name], DATATYPES[spec.datatype])
            backend.buffers[spec.name] = _check(backend.cudart.cudaMalloc(nbytes))
            backend.capacity[spec.name] = nbytes
    except EngineError:
        backend.close()  # out of device memory: give back the stream and what was allocated
        raise


def load_tensorrt(path: Path) -> TensorRTBackend:
    """The server's backend for a plan file: with the sidecar beside it when there is one
    (an unreadable one is an error), else from the engine alone (a user's trtexec plan)."""
    sidecar = load_sidecar(path) if sidecar_path(path).exists() else None
    return open_plan(path.read_bytes(), sidecar, path)
