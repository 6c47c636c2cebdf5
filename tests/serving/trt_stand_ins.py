"""Stand-ins for tensorrt and cuda-python, so the TensorRT runner's bookkeeping runs on CPU.

Host memory plays device memory (cudaMalloc hands out numpy buffers, cudaMemcpyAsync is a
memmove) and the "engine" answers logits[:, k] = pixel k of each image, as float32. What
this checks is the runner's part: runtime settings, shapes, addresses, padding, frees.
Whether TensorRT behaves as documented is for ``-m tensorrt`` on a GPU host.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import types
from typing import Any

import numpy as np
import pytest

from tests.serving.serving_helpers import CLASSES, contract

VERSION, GPU, COMPUTE = "10.3.0.30", "Stand-in GPU", (8, 9)
IMAGE = (3, 8, 8)


def sidecar(**overrides: Any) -> dict[str, Any]:
    """A sidecar this stand-in host accepts."""
    base = {
        "format": "tensorrt",
        "metadata": contract().to_metadata(),
        "tensorrt_version": VERSION,
        "gpu_name": GPU,
        "compute_capability": "{}.{}".format(*COMPUTE),
    }
    return {**base, **overrides}


def _view(pointer: int, nbytes: int, dtype: str) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(pointer), dtype)


class Cudart:
    """cuda.bindings.runtime: every call returns (error, *values), as cuda-python does."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}  # live allocations by pointer
        self.streams: set[int] = set()  # live streams
        self.freed: list[int] = []
        self._handles = itertools.count(100)

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
        ctypes.memmove(dst, src, nbytes)
        return (0,)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.input_shapes: list[tuple[int, ...]] = []
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, high = self.engine.batches
        assert low <= shape[0] <= high, f"batch {shape[0]} is outside the profile {low}..{high}"
        self.input_shapes.append(tuple(shape))
        return True

    def set_tensor_address(self, name: str, pointer: int) -> None:
        self.addresses[name] = pointer

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        rows = self.input_shapes[-1][0]
        return (rows, *IMAGE) if name == "images" else (rows, len(CLASSES))

    def execute_async_v3(self, stream: int) -> bool:
        rows = self.input_shapes[-1][0]
        pixels = _view(self.addresses["images"], rows * int(np.prod(IMAGE)), "u1")
        logits = _view(self.addresses["logits"], rows * len(CLASSES) * 4, "<f4")
        logits[:] = pixels.reshape(rows, -1)[:, : len(CLASSES)].reshape(-1)
        return True


class Engine:
    TENSORS = {"images": ("UINT8", (-1, *IMAGE)), "logits": ("FLOAT", (-1, len(CLASSES)))}

    def __init__(self, batches: tuple[int, int], tensors: dict | None = None) -> None:
        self.batches = batches
        self.tensors = tensors or self.TENSORS
        self.num_io_tensors = len(self.tensors)
        self.contexts: list[Context] = []

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name=self.tensors[name][0])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "images" else "OUTPUT"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        low, high = self.batches
        return [(low, *IMAGE), (high, *IMAGE), (high, *IMAGE)]

    def create_execution_context(self) -> Context:
        self.contexts.append(Context(self))
        return self.contexts[-1]


def tensorrt_module(batches: tuple[int, int], tensors: dict | None = None) -> types.ModuleType:
    """A ``tensorrt`` whose Runtime notes its host-code setting when it deserializes."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.engine_host_code_allowed = False  # TensorRT's default
            self.host_code_when_deserialized: bool | None = None

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            self.host_code_when_deserialized = self.engine_host_code_allowed
            return Engine(batches, tensors)

    trt.Runtime = Runtime
    return trt


def install(
    monkeypatch: pytest.MonkeyPatch, batches: tuple[int, int] = (1, 4), tensors: dict | None = None
) -> Cudart:
    """Put the stand-ins where ``import tensorrt`` and cuda-python's import find them."""
    cudart = Cudart()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    modules = {
        "tensorrt": tensorrt_module(batches, tensors),
        "cuda": cuda,
        "cuda.bindings": bindings,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return cudart


def expected_logits(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)[:, : len(CLASSES)].astype(np.float32)
