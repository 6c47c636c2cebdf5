"""Open Inference Protocol v2 infer bodies: JSON tensors and the binary tensor extension.

Decoding validates everything a request can get wrong (names, datatypes, shapes, byte
counts) so a bad request is answered 400 before it joins a batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# OIP datatype -> little-endian numpy dtype (BYTES has no fixed width; our models never use it).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}


class ProtocolError(ValueError):
    """The request is malformed; answered 400 with this message."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks the batch dimension

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class InferRequest(NamedTuple):  # a tuple: built for every request, cheaper than a dataclass
    array: np.ndarray  # the model's one input, batch first
    outputs: tuple[tuple[str, bool], ...]  # (name, binary) in the order to answer
    request_id: str | None = None
    timeout_us: int | None = None


def _header(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length {header_length} is outside the body "
            f"of {len(body)} bytes"
        )
    end = len(body) if header_length is None else header_length
    try:
        header = json.loads(view[:end].tobytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise ProtocolError(f"malformed JSON in request: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("request JSON must be an object")
    return header, view[end:]


def _shape(entry: dict[str, Any], spec: TensorSpec, max_batch: int) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"input '{spec.name}' needs a shape list of integers, got {shape!r}")
    expected = spec.shape[1:]
    if len(shape) != len(spec.shape) or tuple(shape[1:]) != expected:
        want = [-1, *expected]
        raise ProtocolError(f"input '{spec.name}' has shape {shape}; model expects {want}")
    if not 1 <= shape[0] <= max_batch:
        raise ProtocolError(
            f"input '{spec.name}' has batch {shape[0]}; this server takes 1 to {max_batch}"
        )
    return tuple(shape)


# Which parsed JSON array kinds each tensor kind accepts, and how to say so.
_JSON_KINDS = {"i": "iu", "u": "iu", "f": "iuf", "b": "b"}
_KIND_WORDS = {"i": "integers", "u": "integers", "f": "numbers", "b": "booleans"}


def _json_data(data: Any, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = DATATYPES[spec.datatype]
    try:
        raw = np.asarray(data)
    except ValueError as exc:
        raise ProtocolError(f"input '{spec.name}' data is ragged: {exc}") from None
    if raw.size != math.prod(shape):
        raise ProtocolError(
            f"input '{spec.name}' has {raw.size} values; shape {list(shape)} needs "
            f"{math.prod(shape)}"
        )
    if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
        words = _KIND_WORDS[dtype.kind]
        raise ProtocolError(f"input '{spec.name}' data must be {words} for {spec.datatype}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"input '{spec.name}' data is out of range for {spec.datatype}")
    return raw.astype(dtype).reshape(shape)


def _binary_data(
    entry: dict[str, Any], spec: TensorSpec, shape: tuple[int, ...], binary: memoryview, at: int
) -> np.ndarray:
    size = entry["parameters"]["binary_data_size"]
    dtype = DATATYPES[spec.datatype]
    need = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size != need:
        raise ProtocolError(
            f"input '{spec.name}' declares binary_data_size {size}; shape {list(shape)} of "
            f"{spec.datatype} needs {need} bytes"
        )
    if at + size > len(binary):
        raise ProtocolError(
            f"input '{spec.name}' binary data runs past the body: {len(binary)} bytes follow "
            f"the JSON header, inputs declare at least {at + size}"
        )
    return np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=at).reshape(shape)


def _input(
    header: dict[str, Any], spec: TensorSpec, binary: memoryview, max_batch: int
) -> np.ndarray:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise ProtocolError("request needs an 'inputs' list of tensor objects")
    names = [i.get("name") for i in inputs]
    if names != [spec.name]:
        unknown = [n for n in names if n != spec.name]
        detail = f"unknown input {unknown[0]!r}" if unknown else f"inputs {names}"
        raise ProtocolError(f"{detail}; the model takes exactly one input '{spec.name}'")
    entry = inputs[0]
    if entry.get("datatype") != spec.datatype:
        raise ProtocolError(
            f"input '{spec.name}' has datatype {entry.get('datatype')!r}; "
            f"model expects {spec.datatype}"
        )
    shape = _shape(entry, spec, max_batch)
    parameters = entry.get("parameters") or {}
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        array = _binary_data(entry, spec, shape, binary, 0)
        used = array.nbytes
    elif "data" in entry:
        array, used = _json_data(entry["data"], spec, shape), 0
    else:
        raise ProtocolError(f"input '{spec.name}' has neither 'data' nor binary_data_size")
    if used != len(binary):
        raise ProtocolError(
            f"{len(binary)} bytes of binary data follow the JSON header but inputs declare {used}"
        )
    return array


def _outputs(header: dict[str, Any], specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, bool], ...]:
    parameters = header.get("parameters") or {}
    default_binary = bool(parameters.get("binary_data_output", False))
    requested = header.get("outputs")
    if requested is None:
        return tuple((s.name, default_binary) for s in specs)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError("'outputs' must be a list of objects")
    known = {s.name for s in specs}
    chosen = []
    for entry in requested:
        name = entry.get("name")
        if not isinstance(name, str) or name not in known:
            raise ProtocolError(f"unknown output {name!r}; the model has {sorted(known)}")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"output '{name}' parameters must be an object")
        chosen.append((name, bool(parameters.get("binary_data", default_binary))))
    return tuple(chosen)


def decode_infer(
    body: bytes,
    header_length: int | None,
    spec: TensorSpec,
    outputs: tuple[TensorSpec, ...],
    max_batch: int,
) -> InferRequest:
    """Parse and validate an infer body against the model's input and outputs."""
    if header_length == 0:
        # The whole body is one raw tensor, batch 1, and every output comes back binary.
        shape = (1, *spec.shape[1:])
        raw = {"shape": list(shape), "parameters": {"binary_data_size": len(body)}}
        array = _binary_data(raw, spec, shape, memoryview(body), 0)
        return InferRequest(array, tuple((s.name, True) for s in outputs))
    header, binary = _header(body, header_length)
    array = _input(header, spec, binary, max_batch)
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("request 'parameters' must be an object")
    timeout = parameters.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise ProtocolError(
            f"parameter 'timeout' must be microseconds as an integer, not {timeout!r}"
        )
    request_id = header.get("id")
    return InferRequest(
        array,
        _outputs(header, outputs),
        None if request_id is None else str(request_id),
        timeout or None,
    )


def encode_infer(
    model_name: str,
    request: InferRequest,
    results: dict[str, np.ndarray],
    datatypes: dict[str, str],
) -> tuple[list[bytes], int | None]:
    """Body parts (JSON header first) and the Inference-Header-Content-Length, if binary."""
    entries = []
    blobs: list[bytes] = []
    for name, binary in request.outputs:
        array = results[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatypes[name],
            "shape": list(array.shape),
        }
        if binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.tobytes())
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request.request_id is not None:
        response["id"] = request.request_id
    response["outputs"] = entries
    header = json.dumps(response, separators=(",", ":")).encode()
    return [header, *blobs], (len(header) if blobs else None)


@dataclass(frozen=True)
class _Parsed:
    """What a repeated binary-input header decodes to, without the tensor itself."""

    shape: tuple[int, ...]
    nbytes: int
    outputs: tuple[tuple[str, bool], ...]
    request_id: str | None
    timeout_us: int | None


class InferCodec:
    """decode_infer/encode_infer for one model, remembering the JSON headers clients repeat.

    A client that sends binary tensors repeats its JSON header byte for byte (same shape,
    same outputs), and answers of the same shape share theirs, so each is parsed, validated
    or rendered once. Only headers are remembered, never tensor bytes.
    """

    _LIMIT = 256  # distinct headers remembered; a client varying ids or shapes just misses

    def __init__(
        self, model_name: str, spec: TensorSpec, outputs: tuple[TensorSpec, ...], max_batch: int
    ) -> None:
        self.model_name = model_name
        self.spec = spec
        self.outputs = outputs
        self.max_batch = max_batch
        self._dtype = DATATYPES[spec.datatype]
        self._datatypes = {o.name: o.datatype for o in outputs}
        self._requests: dict[bytes, _Parsed] = {}
        self._answers: dict[tuple, bytes] = {}

    def decode(self, body: bytes, header_length: int | None) -> InferRequest:
        if not header_length or header_length >= len(body):  # raw tensor or JSON data
            return decode_infer(body, header_length, self.spec, self.outputs, self.max_batch)
        key = body[:header_length]
        known = self._requests.get(key)
        if known is None or len(body) - header_length != known.nbytes:
            request = decode_infer(body, header_length, self.spec, self.outputs, self.max_batch)
            parsed = _Parsed(
                request.array.shape,
                request.array.nbytes,
                request.outputs,
                request.request_id,
                request.timeout_us,
            )
            self._remember(self._requests, key, parsed)
            return request
        count = math.prod(known.shape)
        array = np.frombuffer(body, self._dtype, count, header_length).reshape(known.shape)
        return InferRequest(array, known.outputs, known.request_id, known.timeout_us)

    def encode(
        self, request: InferRequest, results: dict[str, np.ndarray]
    ) -> tuple[list[bytes], int | None]:
        if request.request_id is None:  # an id makes every header differ
            arrays = [results[name] for name, _ in request.outputs]
            key = (request.outputs, *[a.shape for a in arrays])
            header = self._answers.get(key)
            if header is None and all(binary for _, binary in request.outputs):
                parts, _ = encode_infer(self.model_name, request, results, self._datatypes)
                header = self._remember(self._answers, key, parts[0])
            if header is not None:
                return [header, *[a.tobytes() for a in arrays]], len(header)
        return encode_infer(self.model_name, request, results, self._datatypes)

    def _remember(self, cache: dict, key: Any, value: Any) -> Any:
        if len(cache) >= self._LIMIT:
            cache.clear()
        cache[key] = value
        return value
