"""Stand-ins for tensorrt and cuda-python, so the TensorRT runner's bookkeeping runs on CPU.

Host memory plays device memory (cudaMalloc hands out numpy buffers, cudaMemcpyAsync is a
memmove, and both refuse to touch bytes outside a live allocation). An engine is a table
of tensors (TensorRT dtype, shape with -1 for a dynamic dim, profile 0 for a dynamic input)
and a rule computing its outputs from its inputs; the context derives output shapes from
the rule, as TensorRT does from the network. The default engine answers
logits[:, k] = pixel k of each image, as float32. What this checks is the runner's part:
runtime settings, shapes, addresses, padding, frees. Whether TensorRT behaves as
documented is for ``-m tensorrt`` on a GPU host.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from serving.contract import IMAGE_CLASSIFICATION, ImagePreprocessing, ModelContract
from tests.serving.serving_helpers import CLASSES

VERSION, GPU, COMPUTE = "10.3.0.30", "Stand-in GPU", (8, 9)
IMAGE = (3, 8, 8)
NUMPY = {  # TensorRT DataType name -> numpy dtype, for the types the runner serves
    "FLOAT": "<f4",
    "HALF": "<f2",
    "INT8": "i1",
    "UINT8": "u1",
    "INT32": "<i4",
    "INT64": "<i8",
    "BOOL": "?",
}

Shape = tuple[int, ...]
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Tensor:
    mode: str  # "INPUT" | "OUTPUT"
    dtype: str  # a TensorRT DataType name
    shape: Shape  # -1: dynamic
    profile: tuple[Shape, Shape, Shape] | None = None  # min, opt, max: dynamic inputs only


def tensor_input(
    dtype: str, shape: Shape, low: Shape | None = None, high: Shape | None = None
) -> Tensor:
    """An input; one with a dynamic dim needs its profile's min and max (opt = max)."""
    return Tensor("INPUT", dtype, shape, None if low is None else (low, high, high))


def tensor_output(dtype: str, shape: Shape) -> Tensor:
    return Tensor("OUTPUT", dtype, shape)


@dataclass(frozen=True)
class EngineSpec:
    tensors: dict[str, Tensor]  # in I/O order
    rule: Callable[[Arrays], Arrays]  # inputs -> outputs, each already of its dtype


def image_engine(batches: tuple[int, int] = (1, 4)) -> EngineSpec:
    """The tiny classifier: uint8 images [N, 3, 8, 8] -> float32 logits [N, 4]."""
    low, high = batches
    tensors = {
        "images": tensor_input("UINT8", (-1, *IMAGE), (low, *IMAGE), (high, *IMAGE)),
        "logits": tensor_output("FLOAT", (-1, len(CLASSES))),
    }
    return EngineSpec(tensors, lambda x: {"logits": expected_logits(x["images"])})


def two_in_three_out() -> EngineSpec:
    """ids int32 [N, T] (T dynamic) and weight fp16 [N, 3] -> total fp32 [N],
    doubled int32 [N, T], positive bool [N, 3]. Batch profiles 1..8 and 2..4, T 1..16."""
    tensors = {
        "ids": tensor_input("INT32", (-1, -1), (1, 1), (8, 16)),
        "weight": tensor_input("HALF", (-1, 3), (2, 3), (4, 3)),
        "total": tensor_output("FLOAT", (-1,)),
        "doubled": tensor_output("INT32", (-1, -1)),
        "positive": tensor_output("BOOL", (-1, 3)),
    }
    return EngineSpec(tensors, two_in_three_out_rule)


def two_in_three_out_rule(x: Arrays) -> Arrays:
    ids, weight = x["ids"], x["weight"]
    total = ids.sum(axis=1, dtype=np.float32) + weight.astype(np.float32).sum(axis=1)
    return {"total": total, "doubled": ids * 2, "positive": weight > 0}


def fixed_batch_engine() -> EngineSpec:
    """No batch dim: x fp32 [2, T] (T 1..8) -> y fp32 [2, T] = 2x."""
    tensors = {
        "x": tensor_input("FLOAT", (2, -1), (2, 1), (2, 8)),
        "y": tensor_output("FLOAT", (2, -1)),
    }
    return EngineSpec(tensors, lambda x: {"y": x["x"] * 2})


def contract() -> ModelContract:
    image = ImagePreprocessing("images", "NCHW", IMAGE, "uint8", (0.0, 255.0))
    return ModelContract(
        model_name="tiny",
        task=IMAGE_CLASSIFICATION,
        class_names=CLASSES,
        image=image,
        precision="fp32",
    )


def sidecar(**overrides: Any) -> dict[str, Any]:
    """A sidecar this stand-in host accepts, for the default engine."""
    base = {
        "format": "tensorrt",
        "metadata": contract().to_metadata(),
        "tensorrt_version": VERSION,
        "gpu_name": GPU,
        "compute_capability": "{}.{}".format(*COMPUTE),
        "precision": "fp32",
        # As pipeline/tensorrt_build.network_io writes them: protocol dtypes, -1 dynamic.
        "inputs": [{"name": "images", "dtype": "UINT8", "shape": [-1, *IMAGE]}],
        "outputs": [{"name": "logits", "dtype": "FP32", "shape": [-1, len(CLASSES)]}],
    }
    return {**base, **overrides}


class Cudart:
    """cuda.bindings.runtime: every call returns (error, *values), as cuda-python does."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}  # live allocations by pointer
        self.streams: set[int] = set()  # live streams
        self.freed: list[int] = []
        self._handles = itertools.count(100)

    def device(self, pointer: int, nbytes: int) -> np.ndarray:
        """The bytes at ``pointer``, which must lie inside one live allocation."""
        block = next(
            (b for p, b in self.memory.items() if p <= pointer < p + max(b.nbytes, 1)), None
        )
        assert block is not None, f"{pointer:#x} is not device memory"
        start = pointer - block.ctypes.data
        assert start + nbytes <= block.nbytes, f"{nbytes} bytes overrun a {block.nbytes} block"
        return block[start : start + nbytes]

    def cudaGetDevice(self) -> tuple[int, int]:
        return 0, 0

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        return 0, types.SimpleNamespace(name=GPU.encode(), major=COMPUTE[0], minor=COMPUTE[1])

    def cudaStreamCreate(self) -> tuple[int, int]:
        stream = next(self._handles)
        self.streams.add(stream)
        return 0, stream

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0 if stream in self.streams else 400,)  # 400: invalid resource handle

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.streams.remove(stream)
        return (0,)

    def cudaMalloc(self, size: int) -> tuple[int, int]:
        block = np.zeros(size, np.uint8)
        self.memory[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, pointer: int) -> tuple[int]:
        del self.memory[pointer]
        self.freed.append(pointer)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple:
        self.device(dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (0,)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, Shape] = {}  # input shapes set so far
        self.runs: list[dict[str, Shape]] = []  # the input shapes of each execution
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Shape) -> bool:
        """False for a shape outside profile 0 or a fixed dim changed, as TensorRT's."""
        tensor = self.engine.spec.tensors[name]
        low, _, high = tensor.profile or (tensor.shape,) * 3
        ok = tensor.mode == "INPUT" and len(shape) == len(tensor.shape)
        ok = ok and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True))
        if ok:
            self.shapes[name] = tuple(int(d) for d in shape)
        return ok

    def infer_shapes(self) -> list[str]:
        """The inputs whose shape is not set yet."""
        tensors = self.engine.spec.tensors
        return [n for n, t in tensors.items() if t.mode == "INPUT" and n not in self.shapes]

    def get_tensor_shape(self, name: str) -> Shape:
        tensor = self.engine.spec.tensors[name]
        if tensor.mode == "INPUT":
            return self.shapes.get(name, tensor.shape)
        if self.infer_shapes():
            return tensor.shape
        zeros = {n: np.zeros(s, NUMPY[self._dtype(n)]) for n, s in self.shapes.items()}
        return self.engine.spec.rule(zeros)[name].shape

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert stream in self.engine.cudart.streams
        inputs = {name: self._tensor(name, shape) for name, shape in self.shapes.items()}
        self.runs.append(dict(self.shapes))
        for name, value in self.engine.spec.rule(inputs).items():
            self._tensor(name, value.shape)[...] = value
        return True

    def _dtype(self, name: str) -> str:
        return self.engine.spec.tensors[name].dtype

    def _tensor(self, name: str, shape: Shape) -> np.ndarray:
        dtype = np.dtype(NUMPY[self._dtype(name)])
        raw = self.engine.cudart.device(self.addresses[name], math.prod(shape) * dtype.itemsize)
        return raw.view(dtype).reshape(shape)


class Engine:
    def __init__(self, spec: EngineSpec, cudart: Cudart) -> None:
        self.spec, self.cudart = spec, cudart
        self.num_io_tensors = len(spec.tensors)
        self.num_optimization_profiles = 1
        self.contexts: list[Context] = []

    def get_tensor_name(self, i: int) -> str:
        return list(self.spec.tensors)[i]

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name=self.spec.tensors[name].dtype)

    def get_tensor_shape(self, name: str) -> Shape:
        return self.spec.tensors[name].shape

    def get_tensor_mode(self, name: str) -> str:
        return self.spec.tensors[name].mode

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[Shape]:
        assert profile == 0
        tensor = self.spec.tensors[name]
        return list(tensor.profile or (tensor.shape,) * 3)

    def create_execution_context(self) -> Context:
        self.contexts.append(Context(self))
        return self.contexts[-1]


def tensorrt_module(spec: EngineSpec, cudart: Cudart) -> types.ModuleType:
    """A ``tensorrt`` whose Runtime notes its host-code setting when it deserializes.

    ``plans`` lists what it was given to deserialize; a plan not starting b"plan" is
    refused (None), as TensorRT refuses a file that is not one.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.plans = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.engine_host_code_allowed = False  # TensorRT's default
            self.host_code_when_deserialized: bool | None = None

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            trt.plans.append(plan)
            self.host_code_when_deserialized = self.engine_host_code_allowed
            return Engine(spec, cudart) if plan.startswith(b"plan") else None

    trt.Runtime = Runtime
    return trt


def install(
    monkeypatch: pytest.MonkeyPatch,
    batches: tuple[int, int] = (1, 4),
    engine: EngineSpec | None = None,
) -> Cudart:
    """Put the stand-ins where ``import tensorrt`` and cuda-python's import find them.

    The engine is ``engine``, or else the image classifier with batch profile ``batches``.
    """
    cudart = Cudart()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    modules = {
        "tensorrt": tensorrt_module(engine or image_engine(batches), cudart),
        "cuda": cuda,
        "cuda.bindings": bindings,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return cudart


def expected_logits(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)[:, : len(CLASSES)].astype(np.float32)
