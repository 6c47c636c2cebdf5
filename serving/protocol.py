"""Open Inference Protocol v2 infer bodies: JSON tensors and the binary tensor extension.

A request carries every input of the model's signature, any OIP datatype (BYTES
included), each as JSON ``data`` or as binary data after the JSON header. Each output
comes back as asked: JSON or binary, the tensor itself or Triton's classification
extension (the top k values as ``"<value>:<index>[:<label>]"`` strings).

Decoding validates everything a request can get wrong (names, datatypes, shapes, batch
sizes, byte counts, BYTES framing) so a bad request is answered 400 before it joins a
batch.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, NamedTuple, Protocol

import numpy as np

from serving.contract import Signature, TensorSpec

# OIP datatype -> little-endian numpy dtype. BYTES elements have no fixed width: decoded,
# they are an object array of str, which is what onnxruntime's string tensors take (it
# turns a bytes element into the text "b'...'").
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
        "BYTES": "O",
    }.items()
}
_LENGTH = struct.Struct("<I")  # the 4-byte length before each binary BYTES element


class ProtocolError(ValueError):
    """The request is malformed; answered 400 with this message."""


class SequenceRules(Protocol):
    """A sequence model's extra request checks and batch groups (serving.sequence)."""

    def check(self, inputs: dict[str, np.ndarray]) -> None: ...

    def group(self, arrays: list[np.ndarray]) -> tuple: ...


class RequestedOutput(NamedTuple):
    name: str
    binary: bool
    classification: int = 0  # top-k classes asked for; 0: the tensor itself


class InferRequest(NamedTuple):  # a tuple: built for every request, cheaper than a dataclass
    inputs: dict[str, np.ndarray]  # every model input, in signature order
    rows: int  # the batch (first dim) of a batching model; 1 for a non-batching one
    group: tuple  # requests batch together only within a group: inputs' non-batch shapes
    outputs: tuple[RequestedOutput, ...]  # in the order to answer
    request_id: str | None = None
    timeout_us: int | None = None


# Where each binary input lies after the JSON header, for InferCodec to reuse:
# (name, dtype, element count, byte offset, shape) per input, in signature order.
_Layout = tuple[tuple[str, np.dtype, int, int, tuple[int, ...]], ...]


# the JSON header -------------------------------------------------------------------------
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


def _parameters(header: dict[str, Any]) -> tuple[bool, int | None]:
    """The request-level binary_data_output and timeout (µs; None for none)."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("request 'parameters' must be an object")
    timeout = parameters.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise ProtocolError(
            f"parameter 'timeout' must be microseconds as an integer, not {timeout!r}"
        )
    return bool(parameters.get("binary_data_output", False)), timeout or None


# datatypes and shapes --------------------------------------------------------------------
def _datatype(entry: dict[str, Any], spec: TensorSpec) -> None:
    if entry.get("datatype") != spec.datatype:
        raise ProtocolError(
            f"input '{spec.name}' has datatype {entry.get('datatype')!r}; "
            f"model expects {spec.datatype}"
        )


def _shape(
    entry: dict[str, Any], spec: TensorSpec, batching: bool, max_batch: int
) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"input '{spec.name}' needs a shape list of integers, got {shape!r}")
    if len(shape) != len(spec.shape):
        raise ProtocolError(
            f"input '{spec.name}' has shape {shape}; model expects {len(spec.shape)} dims "
            f"{list(spec.shape)}"
        )
    if batching and not 1 <= shape[0] <= max_batch:
        raise ProtocolError(
            f"input '{spec.name}' has batch {shape[0]}; this server takes 1 to {max_batch}"
        )
    for dim, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got < 0 or want not in (-1, got):
            need = "a size >= 0" if want == -1 else want
            raise ProtocolError(
                f"input '{spec.name}' has shape {shape}; dim {dim} must be {need} "
                f"(model shape {list(spec.shape)})"
            )
    return tuple(shape)


# JSON data -------------------------------------------------------------------------------
# Which parsed JSON array kinds each tensor kind accepts, and how to say so.
_JSON_KINDS = {"i": "iu", "u": "iu", "f": "iuf", "b": "b"}
_KIND_WORDS = {"i": "integers", "u": "integers", "f": "numbers", "b": "booleans"}


def _json_data(data: Any, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = DATATYPES[spec.datatype]
    try:
        raw = np.asarray(data, dtype=object if dtype.kind == "O" else None)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"input '{spec.name}' data is ragged: {exc}") from None
    if raw.size != math.prod(shape):
        raise ProtocolError(
            f"input '{spec.name}' has {raw.size} values; shape {list(shape)} needs "
            f"{math.prod(shape)}"
        )
    if dtype.kind == "O":
        if not all(type(v) is str for v in raw.flat):
            raise ProtocolError(f"input '{spec.name}' data must be strings for BYTES")
        return raw.reshape(shape)
    if raw.size and dtype.kind in "iu" and raw.dtype.kind in "fO":
        # numpy parses integers past int64 (UINT64's top half) as floats or objects.
        return _exact_integers(data, spec).reshape(shape)
    if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
        words = _KIND_WORDS[dtype.kind]
        raise ProtocolError(f"input '{spec.name}' data must be {words} for {spec.datatype}")
    if dtype.kind in "iu" and raw.size:
        _check_range(raw.min(), raw.max(), spec)
    return raw.astype(dtype).reshape(shape)


def _exact_integers(data: Any, spec: TensorSpec) -> np.ndarray:
    """Integer data as Python ints, so none loses precision on the way to its dtype."""
    values = np.asarray(data, dtype=object)
    if not all(type(v) is int for v in values.flat):
        raise ProtocolError(f"input '{spec.name}' data must be integers for {spec.datatype}")
    _check_range(min(values.flat), max(values.flat), spec)
    return values.astype(DATATYPES[spec.datatype])


def _check_range(low: Any, high: Any, spec: TensorSpec) -> None:
    info = np.iinfo(DATATYPES[spec.datatype])
    if low < info.min or high > info.max:
        raise ProtocolError(f"input '{spec.name}' data is out of range for {spec.datatype}")


# binary data -----------------------------------------------------------------------------
def _binary_data(
    entry: dict[str, Any], spec: TensorSpec, shape: tuple[int, ...], binary: memoryview, at: int
) -> np.ndarray:
    size = entry["parameters"]["binary_data_size"]
    dtype = DATATYPES[spec.datatype]
    need = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size < 0 or (dtype.kind != "O" and size != need):
        what = "a byte count" if dtype.kind == "O" else f"{need} bytes"
        raise ProtocolError(
            f"input '{spec.name}' declares binary_data_size {size!r}; shape {list(shape)} of "
            f"{spec.datatype} needs {what}"
        )
    if at + size > len(binary):
        raise ProtocolError(
            f"input '{spec.name}' binary data runs past the body: {len(binary)} bytes follow "
            f"the JSON header, inputs declare at least {at + size}"
        )
    if dtype.kind == "O":
        return _binary_strings(binary[at : at + size], spec, shape)
    return np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=at).reshape(shape)


def _binary_strings(data: memoryview, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    """BYTES elements framed as a 4-byte little-endian length, then that many UTF-8 bytes."""
    count, at, end = math.prod(shape), 0, len(data)
    items = []
    while len(items) < count:  # each element takes at least 4 bytes: this ends by `end`
        if at + 4 > end:
            raise ProtocolError(
                f"input '{spec.name}' BYTES data ends inside element {len(items)}'s length; "
                f"shape {list(shape)} needs {count} elements in its {end} bytes"
            )
        (length,) = _LENGTH.unpack_from(data, at)
        if at + 4 + length > end:
            raise ProtocolError(
                f"input '{spec.name}' BYTES element {len(items)} claims {length} bytes; "
                f"{end - at - 4} of its binary_data_size {end} remain"
            )
        try:
            items.append(str(data[at + 4 : at + 4 + length], "utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(
                f"input '{spec.name}' BYTES element {len(items)} is not UTF-8 text"
            ) from None
        at += 4 + length
    if at != end:
        raise ProtocolError(
            f"input '{spec.name}' has {end - at} bytes left over after its {count} BYTES "
            f"elements (binary_data_size {end})"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


# inputs ----------------------------------------------------------------------------------
def _specs(entries: Any, signature: Signature) -> list[TensorSpec]:
    """Each entry's model input: every input named exactly once."""
    if not isinstance(entries, list) or not all(isinstance(i, dict) for i in entries):
        raise ProtocolError("request needs an 'inputs' list of tensor objects")
    by_name = {s.name: s for s in signature.inputs}
    takes = ", ".join(f"'{s.name}'" for s in signature.inputs)
    specs: list[TensorSpec] = []
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or name not in by_name:
            raise ProtocolError(f"unknown input {name!r}; the model takes {takes}")
        if by_name[name] in specs:
            raise ProtocolError(f"input '{name}' appears twice in the request")
        specs.append(by_name[name])
    missing = [f"'{s.name}'" for s in signature.inputs if s not in specs]
    if missing:
        raise ProtocolError(f"request lacks input {', '.join(missing)}; the model takes {takes}")
    return specs


def _tensor(
    entry: dict[str, Any], spec: TensorSpec, shape: tuple[int, ...], binary: memoryview, at: int
) -> tuple[np.ndarray, int | None]:
    """One input's array and how many binary bytes it used (None: it came as JSON)."""
    parameters = entry.get("parameters") or {}
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        array = _binary_data(entry, spec, shape, binary, at)
        return array, parameters["binary_data_size"]
    if "data" in entry:
        return _json_data(entry["data"], spec, shape), None
    raise ProtocolError(f"input '{spec.name}' has neither 'data' nor binary_data_size")


def _same_batch(first: tuple[str, int] | None, name: str, rows: int) -> tuple[str, int]:
    if first is not None and first[1] != rows:
        raise ProtocolError(
            f"inputs '{first[0]}' and '{name}' have batch sizes {first[1]} and {rows}"
        )
    return first or (name, rows)


def _inputs(
    header: dict[str, Any], signature: Signature, binary: memoryview, max_batch: int
) -> tuple[dict[str, np.ndarray], _Layout | None]:
    """Every input's array in signature order, and their layout when all of them are
    binary and fixed-width (else None)."""
    entries = header.get("inputs")
    specs = _specs(entries, signature)
    arrays, offsets, at, first = {}, {}, 0, None
    for entry, spec in zip(entries, specs, strict=True):
        _datatype(entry, spec)
        shape = _shape(entry, spec, signature.batching, max_batch)
        if signature.batching:
            first = _same_batch(first, spec.name, shape[0])
        arrays[spec.name], used = _tensor(entry, spec, shape, binary, at)
        if used is not None:
            offsets[spec.name] = at
            at += used
    if at != len(binary):
        raise ProtocolError(
            f"{len(binary)} bytes of binary data follow the JSON header but inputs declare {at}"
        )
    ordered = {s.name: arrays[s.name] for s in signature.inputs}
    if len(offsets) < len(ordered) or any(a.dtype.kind == "O" for a in ordered.values()):
        return ordered, None
    return ordered, tuple((n, a.dtype, a.size, offsets[n], a.shape) for n, a in ordered.items())


def _raw_input(body: bytes, signature: Signature) -> InferRequest:
    """Inference-Header-Content-Length 0: the whole body is the one input, batch 1, and
    every output comes back binary."""
    if len(signature.inputs) != 1:
        raise ProtocolError(
            f"a raw tensor body (Inference-Header-Content-Length 0) needs a one-input model; "
            f"this one takes {len(signature.inputs)}: send a JSON header"
        )
    spec = signature.inputs[0]
    shape = (1, *spec.shape[1:]) if signature.batching else spec.shape
    if spec.datatype == "BYTES" or -1 in shape:
        raise ProtocolError(
            f"a raw tensor body (Inference-Header-Content-Length 0) needs a fixed-shape, "
            f"fixed-width input; '{spec.name}' is {spec.datatype} {list(spec.shape)}: send a "
            "JSON header"
        )
    raw = {"parameters": {"binary_data_size": len(body)}}
    array = _binary_data(raw, spec, shape, memoryview(body), 0)
    outputs = tuple(RequestedOutput(s.name, True) for s in signature.outputs)
    return InferRequest({spec.name: array}, 1, batch_group(signature, [array]), outputs)


def batch_group(signature: Signature, arrays: list[np.ndarray]) -> tuple:
    """The key of the requests ``arrays`` (inputs in signature order) may batch with: every
    input's non-batch shape, or () when the signature fixes them all (no key to hash)."""
    if signature.batching and signature.shapes_vary:
        return tuple(a.shape[1:] for a in arrays)
    return ()


# outputs ---------------------------------------------------------------------------------
def _class_count(value: Any, spec: TensorSpec) -> int:
    if type(value) is not int or value < 1:
        raise ProtocolError(
            f"output '{spec.name}' parameter 'classification' must be a positive integer "
            f"(how many classes), not {value!r}"
        )
    if spec.datatype in ("BYTES", "BOOL"):
        raise ProtocolError(
            f"output '{spec.name}' is {spec.datatype}; classification needs a numeric output"
        )
    return value


def _output(
    entry: dict[str, Any], specs: dict[str, TensorSpec], default_binary: bool
) -> RequestedOutput:
    name = entry.get("name")
    if not isinstance(name, str) or name not in specs:
        raise ProtocolError(f"unknown output {name!r}; the model has {sorted(specs)}")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"output '{name}' parameters must be an object")
    return RequestedOutput(
        name,
        bool(parameters.get("binary_data", default_binary)),
        _class_count(parameters["classification"], specs[name])
        if "classification" in parameters
        else 0,
    )


def _outputs(
    header: dict[str, Any], signature: Signature, default_binary: bool
) -> tuple[RequestedOutput, ...]:
    requested = header.get("outputs")
    if requested is None:
        return tuple(RequestedOutput(s.name, default_binary) for s in signature.outputs)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError("'outputs' must be a list of objects")
    specs = {s.name: s for s in signature.outputs}
    chosen = tuple(_output(entry, specs, default_binary) for entry in requested)
    names = [o.name for o in chosen]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ProtocolError(f"output '{twice}' is requested twice")
    return chosen


# decode ----------------------------------------------------------------------------------
def _decode(
    body: bytes,
    header_length: int | None,
    signature: Signature,
    max_batch: int,
    sequence: SequenceRules | None = None,
) -> tuple[InferRequest, _Layout | None]:
    if header_length == 0:
        return _raw_input(body, signature), None
    header, binary = _header(body, header_length)
    inputs, layout = _inputs(header, signature, binary, max_batch)
    default_binary, timeout_us = _parameters(header)
    arrays = list(inputs.values())
    rows = arrays[0].shape[0] if signature.batching and arrays else 1
    if sequence is not None:  # shapes only: a repeated header has the same ones
        sequence.check(inputs)
    request_id = header.get("id")
    request = InferRequest(
        inputs,
        rows,
        batch_group(signature, arrays) if sequence is None else sequence.group(arrays),
        _outputs(header, signature, default_binary),
        None if request_id is None else str(request_id),
        timeout_us,
    )
    return request, layout


def decode_infer(
    body: bytes,
    header_length: int | None,
    signature: Signature,
    max_batch: int,
    sequence: SequenceRules | None = None,
) -> InferRequest:
    """Parse and validate an infer body against the model's signature.

    ``header_length`` is the Inference-Header-Content-Length (None: all JSON; 0: the body
    is the one input's raw tensor); ``max_batch`` bounds a batching model's first dim;
    ``sequence``: a sequence model's length rules and batch groups.
    """
    return _decode(body, header_length, signature, max_batch, sequence)[0]


# encode ----------------------------------------------------------------------------------
def _descending(values: np.ndarray) -> np.ndarray:
    """Per row, column indices by value descending, ties by index, NaN last."""
    if values.dtype.kind == "f":  # lexsort is stable: by (is NaN, -value), then index
        return np.lexsort((-values, np.isnan(values)), axis=-1)
    # A stable ascending sort of the mirrored row, mirrored back (negation would wrap uints).
    flipped = np.argsort(values[:, ::-1], axis=1, kind="stable")[:, ::-1]
    return values.shape[1] - 1 - flipped


def top_classes(
    array: np.ndarray, k: int, batching: bool, class_names: tuple[str, ...] = ()
) -> np.ndarray:
    """Triton's classification extension: per row (the whole tensor for a non-batching
    model) the top ``k`` values, each as ``"<value>:<index>"`` plus ``":<label>"`` when
    ``class_names`` has one; the value printed as C++ std::to_string does ("%f" for floats,
    decimal for ints), as in Triton's src/classification.cc. Triton refuses FP16 outputs
    here; we take them (printed "%f" too)."""
    rows = array.shape[0] if batching else 1
    values = array.reshape(rows, math.prod(array.shape[1:]) if batching else array.size)
    order = _descending(values)[:, : min(k, values.shape[1])]
    form = "%f" if values.dtype.kind == "f" else "%d"
    labels = len(class_names)
    strings = np.empty(order.shape, dtype=object)
    for row, (indices, row_values) in enumerate(zip(order.tolist(), values.tolist(), strict=True)):
        strings[row] = [
            f"{form % row_values[i]}:{i}" + (f":{class_names[i]}" if i < labels else "")
            for i in indices
        ]
    return strings if batching else strings[0]


def _utf8(array: np.ndarray) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist()]


def _binary_bytes(array: np.ndarray) -> bytes:
    return b"".join(_LENGTH.pack(len(v)) + v for v in _utf8(array))


def _json_bytes(array: np.ndarray) -> list[str]:
    # JSON carries text only; undecodable bytes are replaced (binary_data returns them exact).
    return [v.decode("utf-8", "replace") for v in _utf8(array)]


def _entry(
    output: RequestedOutput,
    array: np.ndarray,
    datatype: str,
    batching: bool,
    class_names: tuple[str, ...],
) -> tuple[dict[str, Any], bytes | None]:
    """One output's JSON entry, and its binary data if it goes binary."""
    if output.classification:
        array, datatype = top_classes(array, output.classification, batching, class_names), "BYTES"
    entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
    if not output.binary:
        entry["data"] = _json_bytes(array) if datatype == "BYTES" else array.ravel().tolist()
        return entry, None
    blob = _binary_bytes(array) if datatype == "BYTES" else array.tobytes()
    entry["parameters"] = {"binary_data_size": len(blob)}
    return entry, blob


def _encode(
    model_name: str,
    request: InferRequest,
    results: dict[str, np.ndarray],
    datatypes: dict[str, str],
    batching: bool,
    class_names: tuple[str, ...],
) -> tuple[list[bytes], int | None]:
    entries, blobs = [], []
    for output in request.outputs:
        entry, blob = _entry(
            output, results[output.name], datatypes[output.name], batching, class_names
        )
        entries.append(entry)
        if blob is not None:
            blobs.append(blob)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request.request_id is not None:
        response["id"] = request.request_id
    response["outputs"] = entries
    header = json.dumps(response, separators=(",", ":")).encode()
    return [header, *blobs], (len(header) if blobs else None)


def encode_infer(
    model_name: str,
    request: InferRequest,
    results: dict[str, np.ndarray],
    signature: Signature,
    class_names: tuple[str, ...] = (),
) -> tuple[list[bytes], int | None]:
    """Body parts (JSON header first) and the Inference-Header-Content-Length, if binary.

    ``results`` holds the model's outputs by name (BYTES ones as str or bytes elements);
    ``class_names`` label the indices of classification outputs.
    """
    datatypes = {s.name: s.datatype for s in signature.outputs}
    return _encode(model_name, request, results, datatypes, signature.batching, class_names)


# the codec -------------------------------------------------------------------------------
class _Parsed(NamedTuple):
    """What a repeated binary-input header decodes to, without the tensors themselves."""

    layout: _Layout
    nbytes: int
    tail: tuple  # the InferRequest's fields after `inputs`


class InferCodec:
    """decode_infer/encode_infer for one model, remembering the JSON headers clients repeat.

    A client that sends binary tensors repeats its JSON header byte for byte (same shapes,
    same outputs), and answers of the same shape share theirs, so each is parsed, validated
    or rendered once. Only headers are remembered, never tensor bytes. Requests with JSON
    or BYTES inputs, and answers with JSON, BYTES or classification outputs, vary with
    their data and take the full path.
    """

    _LIMIT = 256  # distinct headers remembered; a client varying ids or shapes just misses

    def __init__(
        self,
        model_name: str,
        signature: Signature,
        max_batch: int,
        class_names: tuple[str, ...] = (),
        sequence: SequenceRules | None = None,
    ) -> None:
        self.model_name = model_name
        self.signature = signature
        self.max_batch = max_batch
        self.class_names = class_names
        self.sequence = sequence
        self._datatypes = {o.name: o.datatype for o in signature.outputs}
        self._requests: dict[bytes, _Parsed] = {}
        self._answers: dict[tuple, bytes] = {}

    def decode(self, body: bytes, header_length: int | None) -> InferRequest:
        if not header_length or header_length >= len(body):  # raw tensor or JSON data
            return decode_infer(body, header_length, self.signature, self.max_batch, self.sequence)
        key = body[:header_length]
        known = self._requests.get(key)
        if known is None or len(body) - header_length != known.nbytes:
            return self._decode(body, header_length, key)
        inputs = {}
        for name, dtype, count, offset, shape in known.layout:
            inputs[name] = np.frombuffer(body, dtype, count, header_length + offset).reshape(shape)
        return InferRequest(inputs, *known.tail)

    def _decode(self, body: bytes, header_length: int, key: bytes) -> InferRequest:
        request, layout = _decode(
            body, header_length, self.signature, self.max_batch, self.sequence
        )
        if layout is not None:
            parsed = _Parsed(layout, len(body) - header_length, request[1:])
            self._remember(self._requests, key, parsed)
        return request

    def encode(
        self, request: InferRequest, results: dict[str, np.ndarray]
    ) -> tuple[list[bytes], int | None]:
        if request.request_id is None:  # an id makes every header differ
            arrays = [results[o.name] for o in request.outputs]
            key = (request.outputs, *[a.shape for a in arrays])
            header = self._answers.get(key)
            if header is None and self._same_header(request.outputs):
                parts, _ = self._encode(request, results)
                header = self._remember(self._answers, key, parts[0])
            if header is not None:
                return [header, *[a.tobytes() for a in arrays]], len(header)
        return self._encode(request, results)

    def _same_header(self, outputs: tuple[RequestedOutput, ...]) -> bool:
        """Whether same-shaped answers share a header: all binary and fixed-width."""
        return bool(outputs) and all(
            o.binary and not o.classification and self._datatypes[o.name] != "BYTES"
            for o in outputs
        )

    def _encode(
        self, request: InferRequest, results: dict[str, np.ndarray]
    ) -> tuple[list[bytes], int | None]:
        batching = self.signature.batching
        return _encode(
            self.model_name, request, results, self._datatypes, batching, self.class_names
        )

    def _remember(self, cache: dict, key: Any, value: Any) -> Any:
        if len(cache) >= self._LIMIT:
            cache.clear()
        cache[key] = value
        return value
