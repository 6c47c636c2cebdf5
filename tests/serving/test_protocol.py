"""The infer codec below the HTTP layer, the OpenAPI document, and the classify helpers.

The codec is checked on hand-written bodies (every bad request is a ProtocolError naming
the tensor), on bodies tritonclient builds and answers tritonclient parses, on a real
onnxruntime string model, and by properties over arbitrary bytes and JSON (only
ProtocolError, i.e. 400, may escape).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from serving import openapi
from serving.classify import image_bytes, parse_top_k, preprocess, top_k
from serving.contract import Signature, TensorSpec
from serving.protocol import (
    DATATYPES,
    InferCodec,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    decode_infer,
    encode_infer,
    top_classes,
)
from tests.serving.serving_helpers import contract

IMAGES = TensorSpec("images", "UINT8", (-1, 3, 2, 2))
LOGITS = TensorSpec("logits", "FP32", (-1, 4))
PROBABILITIES = TensorSpec("probabilities", "FP32", (-1, 4))
SIG = Signature((IMAGES,), (LOGITS, PROBABILITIES), True)
ROW = 12  # bytes per row of IMAGES
# A text model: token ids and a mask that agree on T (dynamic), and three outputs.
TEXT = Signature(
    (TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "BOOL", (-1, -1))),
    (
        TensorSpec("logits", "FP32", (-1, 3)),
        TensorSpec("hidden", "FP16", (-1, -1, 2)),
        TensorSpec("label", "BYTES", (-1,)),
    ),
    True,
)
# A model without a batch dim (Triton's max_batch_size 0): requests send the full shape.
FIXED = Signature(
    (TensorSpec("x", "FP32", (2, 3)),), (TensorSpec("scores", "FP64", (2, 3)),), False
)
CLASSES = ("cat", "dog", "ship", "truck")


def body(entry: dict, **request) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "images", "datatype": "UINT8", **entry}], **request}
    ).encode()


def infer_body(*inputs: dict, binary: bytes = b"", **request) -> tuple[bytes, int | None]:
    """A body with these input entries, then ``binary`` (and its header length)."""
    header = json.dumps({"inputs": list(inputs), **request}).encode()
    return header + binary, len(header) if binary else None


def binary_entry(name: str, datatype: str, shape: list, size: int) -> dict:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def framed(*items: bytes) -> bytes:
    """BYTES elements as the binary extension frames them."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def triton_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    return tensor.set_data_from_numpy(array, binary_data=binary)


def triton_result(parts: list[bytes], header_length: int | None) -> triton.InferResult:
    return triton.InferResult.from_response_body(b"".join(parts), header_length=header_length)


# one input, as before ---------------------------------------------------------------------
def test_json_nested_data_and_output_selection() -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)
    outputs = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    payload = body({"shape": [2, 3, 2, 2], "data": data.tolist()}, id="x", outputs=outputs)
    parsed = decode_infer(payload, None, SIG, 8)
    np.testing.assert_array_equal(parsed.inputs["images"], data)
    assert parsed.outputs == (RequestedOutput("probabilities", True, 0),)
    assert (
        parsed.request_id == "x" and parsed.rows == 2 and parsed.group == ()
    )  # fixed shapes: one group


def test_binary_input_and_binary_output_default() -> None:
    header = body(
        {"shape": [1, 3, 2, 2], "parameters": {"binary_data_size": 12}},
        parameters={"binary_data_output": True, "timeout": 500},
    )
    parsed = decode_infer(header + bytes(range(12)), len(header), SIG, 8)
    assert parsed.inputs["images"].tolist() == np.arange(12).reshape(1, 3, 2, 2).tolist()
    assert parsed.outputs == (
        RequestedOutput("logits", True),
        RequestedOutput("probabilities", True),
    )
    assert parsed.timeout_us == 500


def test_raw_body_is_the_one_input_batch_1_all_outputs_binary() -> None:
    parsed = decode_infer(bytes(range(12)), 0, SIG, 8)
    assert parsed.inputs["images"].shape == (1, 3, 2, 2) and parsed.rows == 1
    assert all(o.binary and not o.classification for o in parsed.outputs)
    with pytest.raises(ProtocolError, match="'images' declares binary_data_size 11"):
        decode_infer(bytes(11), 0, SIG, 8)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (body({"shape": [1, 3, 2, 2], "data": [1.5] * 12}), "'images' data must be integers"),
        (body({"shape": [1, 3, 2, 2], "data": [300] * 12}), "'images' data is out of range"),
        (body({"shape": [1, 3, 2, 2], "data": ["a"] * 12}), "'images' data must be integers"),
        (body({"shape": [1, 3, 2, 2], "data": [[1, 2], [3]]}), "'images' data is ragged"),
        (body({"shape": "1x3x2x2", "data": []}), "'images' needs a shape list"),
        (body({"shape": [0, 3, 2, 2], "data": []}), "'images' has batch 0"),
        (body({"shape": [9, 3, 2, 2], "data": []}), "'images' has batch 9; .* 1 to 8"),
        (body({"shape": [1, 3, 2, 2]}), "'images' has neither 'data' nor binary_data_size"),
        (
            body({"shape": [1, 3, 2, 2], "data": [0] * 12}, parameters={"timeout": "soon"}),
            "timeout",
        ),
        (json.dumps({"inputs": []}).encode(), "lacks input 'images'"),
        (json.dumps({"inputs": "images"}).encode(), "'inputs' list"),
        (
            body({"shape": [1, 3, 2, 2], "data": [0] * 12}, outputs="logits"),
            "'outputs' must be a list",
        ),
    ],
)
def test_bad_requests_name_the_problem(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode_infer(payload, None, SIG, 8)


def test_encode_mixes_json_and_binary_outputs() -> None:
    results = {
        "logits": np.arange(8, dtype=np.float32).reshape(2, 4),
        "probabilities": np.ones((2, 4), np.float32),
    }
    outputs = (RequestedOutput("logits", False), RequestedOutput("probabilities", True))
    request = InferRequest({"images": np.zeros((2, 3, 2, 2), np.uint8)}, 2, (), outputs, "id-7")
    parts, header_length = encode_infer("tiny", request, results, SIG)
    header = json.loads(parts[0])
    assert header_length == len(parts[0]) and header["id"] == "id-7"
    assert header["outputs"][0]["data"] == list(range(8))
    assert header["outputs"][1]["parameters"]["binary_data_size"] == 32
    assert bytes(parts[1]) == np.ones((2, 4), np.float32).tobytes()


def test_encode_all_json_has_no_header_length() -> None:
    request = InferRequest({}, 1, (), (RequestedOutput("logits", False),))
    parts, header_length = encode_infer(
        "tiny", request, {"logits": np.zeros((1, 4), np.float32)}, SIG
    )
    assert header_length is None and len(parts) == 1


# several inputs and outputs ---------------------------------------------------------------
def test_two_inputs_any_order_three_outputs() -> None:
    ids = np.array([[101, 7, 102], [101, 9, 102]], np.int64)
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    payload, length = infer_body(
        {"name": "mask", "datatype": "BOOL", "shape": [2, 3], "data": mask.tolist()},
        binary_entry("ids", "INT64", [2, 3], ids.nbytes),
        binary=ids.tobytes(),
        outputs=[
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "logits"},
            {"name": "hidden", "parameters": {"binary_data": True}},
        ],
    )
    parsed = decode_infer(payload, length, TEXT, 8)
    assert list(parsed.inputs) == ["ids", "mask"]  # the model's order, not the request's
    np.testing.assert_array_equal(parsed.inputs["ids"], ids)
    np.testing.assert_array_equal(parsed.inputs["mask"], mask)
    assert parsed.rows == 2 and parsed.group == ((3,), (3,))
    assert [o.name for o in parsed.outputs] == ["label", "logits", "hidden"]
    results = {
        "logits": np.array([[0.5, -1, 2], [0, 0, 1]], np.float32),
        "hidden": np.arange(12, dtype=np.float16).reshape(2, 3, 2),
        "label": np.array(["positive", "négative"], dtype=object),
    }
    parts, header_length = encode_infer("text", parsed, results, TEXT)
    answer = triton_result(parts, header_length)
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["label", "logits", "hidden"]
    np.testing.assert_array_equal(answer.as_numpy("logits"), results["logits"])
    np.testing.assert_array_equal(answer.as_numpy("hidden"), results["hidden"])
    assert answer.as_numpy("label").tolist() == [b"positive", "négative".encode()]


def test_dynamic_dims_take_any_size_and_key_the_group() -> None:
    groups = set()
    for tokens in (0, 3, 5):
        payload, _ = infer_body(
            {"name": "ids", "datatype": "INT64", "shape": [1, tokens], "data": [1] * tokens},
            {"name": "mask", "datatype": "BOOL", "shape": [1, tokens], "data": [True] * tokens},
        )
        parsed = decode_infer(payload, None, TEXT, 8)
        assert parsed.inputs["ids"].shape == (1, tokens) and parsed.rows == 1
        groups.add(parsed.group)
    assert groups == {((0,), (0,)), ((3,), (3,)), ((5,), (5,))}


def test_non_batching_model_takes_its_full_shape_with_no_batch_limit() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload, _ = infer_body(
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": data.tolist()}
    )
    parsed = decode_infer(payload, None, FIXED, 1)  # a max_batch of 1 does not apply
    np.testing.assert_array_equal(parsed.inputs["x"], data)
    assert parsed.rows == 1 and parsed.group == ()
    raw = decode_infer(data.tobytes(), 0, FIXED, 1)
    np.testing.assert_array_equal(raw.inputs["x"], data)
    wrong, _ = infer_body({"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0] * 3})
    with pytest.raises(ProtocolError, match=r"'x' has shape \[1, 3\]; dim 0 must be 2"):
        decode_infer(wrong, None, FIXED, 8)


# every datatype ---------------------------------------------------------------------------
def _values(datatype: str) -> np.ndarray:
    """Two rows of three values of ``datatype``, its extremes included."""
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        return np.array([["", "a", "héllo"], ["😀", "x\x00y", "z" * 300]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, 0, info.max], [1, info.max - 1, info.min + 1]], dtype)
    info = np.finfo(dtype)
    return np.array([[info.min, -0.0, info.max], [info.tiny, 1 / 3, -2.5]], dtype)


def _same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, BYTES compared as text whether they came back as str or bytes."""
    if want.dtype == object:
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in got.ravel().tolist()]
        assert text == want.ravel().tolist() and got.shape == want.shape
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips_through_tritonclient(datatype: str, binary: bool) -> None:
    signature = Signature(
        (TensorSpec("x", datatype, (-1, 3)),), (TensorSpec("y", datatype, (-1, 3)),), True
    )
    values = _values(datatype)
    outputs = [triton.InferRequestedOutput("y", binary_data=binary)]
    payload, length = triton.InferenceServerClient.generate_request_body(
        [triton_input("x", values, datatype, binary)], outputs=outputs
    )
    for codec_or_function in (InferCodec("m", signature, 8), None):
        if codec_or_function is None:
            parsed = decode_infer(payload, length, signature, 8)
        else:
            parsed = codec_or_function.decode(payload, length)
        _same(parsed.inputs["x"], values)
        if datatype == "BYTES":  # what onnxruntime's string tensors need
            assert all(type(v) is str for v in parsed.inputs["x"].ravel())
        parts, header_length = encode_infer("m", parsed, {"y": parsed.inputs["x"]}, signature)
        _same(triton_result(parts, header_length).as_numpy("y"), values)


def test_uint64_json_keeps_values_past_int64_exact() -> None:
    payload, _ = infer_body(
        {"name": "x", "datatype": "UINT64", "shape": [1, 3], "data": [2**64 - 1, 2**63, 1]}
    )
    signature = Signature((TensorSpec("x", "UINT64", (-1, 3)),), (), True)
    assert decode_infer(payload, None, signature, 8).inputs["x"].tolist() == [[2**64 - 1, 2**63, 1]]
    too_big, _ = infer_body(
        {"name": "x", "datatype": "UINT64", "shape": [1, 3], "data": [2**64, 0, 1]}
    )
    with pytest.raises(ProtocolError, match="'x' data is out of range for UINT64"):
        decode_infer(too_big, None, signature, 8)


# BYTES ------------------------------------------------------------------------------------
TEXTS = Signature((TensorSpec("text", "BYTES", (-1, 2)),), (TensorSpec("n", "INT32", (-1,)),), True)


def test_bytes_json_and_binary_decode_to_str() -> None:
    payload, _ = infer_body(
        {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": [["ça", ""]]}
    )
    assert decode_infer(payload, None, TEXTS, 8).inputs["text"].tolist() == [["ça", ""]]
    data = framed("ça".encode(), b"", b"x", b"yz")
    payload, length = infer_body(binary_entry("text", "BYTES", [2, 2], len(data)), binary=data)
    parsed = decode_infer(payload, length, TEXTS, 8)
    assert parsed.inputs["text"].tolist() == [["ça", ""], ["x", "yz"]] and parsed.rows == 2


@pytest.mark.parametrize(
    ("data", "declared", "needle"),
    [
        (framed(b"ab", b"c") + b"\x05\x00\x00\x00ab", None, "element 2 claims 5 bytes"),
        (framed(b"ab", b"c"), None, "ends inside element 2's length"),
        (framed(b"ab", b"c", b"d", b"e") + b"!", None, "1 bytes left over after its 4"),
        (framed(b"ab", b"c", b"d", b"e", b"f"), None, "left over after its 4 BYTES"),
        (framed(b"ab", b"\xff\xfe", b"d", b"e"), None, "element 1 is not UTF-8"),
        (framed(b"ab", b"c", b"d", b"e"), 100, "binary data runs past the body"),
        (framed(b"ab", b"c", b"d", b"e"), -1, "declares binary_data_size -1"),
        (framed(b"abc", b"d", b"e", b"f"), 5, "element 0 claims 3 bytes; 1 of its .* 5 remain"),
    ],
)
def test_bytes_framing_that_does_not_add_up_is_400_naming_the_input(
    data: bytes, declared: int | None, needle: str
) -> None:
    entry = binary_entry("text", "BYTES", [2, 2], len(data) if declared is None else declared)
    payload, length = infer_body(entry, binary=data)
    with pytest.raises(ProtocolError, match=f"input 'text' .*{needle}"):
        InferCodec("m", TEXTS, 8).decode(payload, length)


@pytest.mark.parametrize("data", [[["a", 1]], [["a", None]], [["a", ["b"]]], [[True, "b"]]])
def test_bytes_json_takes_only_strings(data: list) -> None:
    payload, _ = infer_body({"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": data})
    with pytest.raises(ProtocolError, match="'text' data must be strings for BYTES"):
        decode_infer(payload, None, TEXTS, 8)


def test_bytes_outputs_encode_str_and_bytes_elements() -> None:
    signature = Signature((), (TensorSpec("s", "BYTES", (-1,)),), True)
    out = np.array(["é", b"\xff raw", "", b"ok"], dtype=object)
    for binary in (True, False):
        request = InferRequest({}, 4, (), (RequestedOutput("s", binary),))
        parts, length = encode_infer("m", request, {"s": out}, signature)
        got = triton_result(parts, length).as_numpy("s").tolist()
        if binary:  # exact bytes, str as UTF-8
            assert got == ["é".encode(), b"\xff raw", b"", b"ok"]
        else:  # JSON holds text: undecodable bytes are replaced
            assert got == ["é", "\ufffd raw", "", "ok"]


def test_onnxruntime_string_tensors_take_and_give_str() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    signature = Signature(
        (TensorSpec("text", "BYTES", (-1, 2)),), (TensorSpec("echo", "BYTES", (-1, 2)),), True
    )
    text = np.array([["héllo", ""], ["😀", "a\x00b"]], dtype=object)
    payload, length = triton.InferenceServerClient.generate_request_body(
        [triton_input("text", text, "BYTES", True)]
    )
    parsed = decode_infer(payload, length, signature, 8)
    (echo,) = session.run(None, parsed.inputs)
    assert echo.dtype == object and all(type(v) is str for v in echo.ravel())
    parts, header_length = encode_infer("m", parsed, {"echo": echo}, signature)
    assert triton_result(parts, header_length).as_numpy("echo").tolist() == [
        [s.encode() for s in row] for row in text.tolist()
    ]
    # Why decoding makes str: onnxruntime turns a bytes element into the text "b'...'".
    (mangled,) = session.run(None, {"text": np.array([[b"a", b"b"]], dtype=object)})
    assert mangled.tolist() == [["b'a'", "b'b'"]]


# every bad request names its tensor ------------------------------------------------------
def _text_inputs(ids_shape=(2, 3), mask_shape=(2, 3), **ids) -> list[dict]:
    count = int(np.prod(ids_shape))
    return [
        {"name": "ids", "datatype": "INT64", "shape": list(ids_shape), "data": [0] * count, **ids},
        {
            "name": "mask",
            "datatype": "BOOL",
            "shape": list(mask_shape),
            "data": [True] * int(np.prod(mask_shape)),
        },
    ]


IDS, MASK = _text_inputs()
EMBED = Signature(
    (TensorSpec("ids", "INT64", (-1, 4)), TensorSpec("mask", "BOOL", (-1, 4))),
    (TensorSpec("v", "FP32", (-1, 4)),),
    True,
)


@pytest.mark.parametrize(
    ("signature", "inputs", "needle"),
    [
        (TEXT, [IDS], r"lacks input 'mask'; the model takes 'ids', 'mask'"),
        (TEXT, [IDS, MASK, {**MASK, "name": "extra"}], r"unknown input 'extra'"),
        (TEXT, [IDS, MASK, MASK], r"input 'mask' appears twice"),
        (TEXT, [{**IDS, "datatype": "INT32"}, MASK], r"'ids' has datatype 'INT32'.* INT64"),
        (TEXT, [IDS, {**MASK, "shape": [2, 3, 1]}], r"'mask' has shape \[2, 3, 1\]; .*2 dims"),
        (TEXT, _text_inputs((2, 3), (3, 3)), r"inputs 'ids' and 'mask' have batch sizes 2 and 3"),
        (TEXT, _text_inputs((9, 1), (9, 1)), r"'ids' has batch 9; this server takes 1 to 8"),
        (TEXT, [IDS, {**MASK, "shape": [2, -3]}], r"'mask' .* dim 1 must be a size >= 0"),
        (
            EMBED,
            _text_inputs((2, 4), (2, 5)),
            r"'mask' has shape \[2, 5\]; dim 1 must be 4 \(model shape \[-1, 4\]\)",
        ),
        (TEXT, [{**IDS, "data": ["1"] * 6}, MASK], r"'ids' data must be integers for INT64"),
        (TEXT, [IDS, {**MASK, "data": [1] * 6}], r"'mask' data must be booleans for BOOL"),
    ],
)
def test_bad_inputs_name_the_tensor(signature: Signature, inputs: list, needle: str) -> None:
    payload, _ = infer_body(*inputs)
    with pytest.raises(ProtocolError, match=needle):
        decode_infer(payload, None, signature, 8)


@pytest.mark.parametrize(
    ("outputs", "needle"),
    [
        ([{"name": "nope"}], r"unknown output 'nope'"),
        ([{"name": "logits"}, {"name": "logits"}], r"output 'logits' is requested twice"),
        ([{"name": "logits", "parameters": [1]}], r"output 'logits' parameters must be an object"),
        *[
            ([{"name": "logits", "parameters": {"classification": k}}], r"'logits' .* positive")
            for k in (0, -1, "3", 2.0, True, None)
        ],
        ([{"name": "label", "parameters": {"classification": 1}}], r"'label' is BYTES"),
        (
            [{"name": "flag", "parameters": {"classification": 1}}],
            r"'flag' is BOOL; classification needs a numeric output",
        ),
    ],
)
def test_bad_outputs_name_the_tensor(outputs: list, needle: str) -> None:
    signature = Signature(TEXT.inputs, (*TEXT.outputs, TensorSpec("flag", "BOOL", (-1,))), True)
    payload, _ = infer_body(IDS, MASK, outputs=outputs)
    with pytest.raises(ProtocolError, match=needle):
        decode_infer(payload, None, signature, 8)


@pytest.mark.parametrize(
    ("signature", "needle"),
    [
        (TEXT, "needs a one-input model; this one takes 2"),
        (TEXTS, "'text' is BYTES"),
        (
            Signature((TensorSpec("ids", "INT64", (-1, -1)),), (), True),
            r"'ids' is INT64 \[-1, -1\]",
        ),
    ],
)
def test_raw_body_needs_one_fixed_width_fixed_shape_input(
    signature: Signature, needle: str
) -> None:
    with pytest.raises(ProtocolError, match=f"Inference-Header-Content-Length 0.*{needle}"):
        decode_infer(bytes(16), 0, signature, 8)


# Triton's classification extension -------------------------------------------------------
def test_classification_top_k_with_and_without_labels() -> None:
    scores = np.array([[0.1, 0.6, 0.3, 0.6], [4, 3, 2, 1]], np.float32)
    assert top_classes(scores, 3, True, CLASSES).tolist() == [
        ["0.600000:1:dog", "0.600000:3:truck", "0.300000:2:ship"],  # ties: lower index first
        ["4.000000:0:cat", "3.000000:1:dog", "2.000000:2:ship"],
    ]
    assert top_classes(scores, 2, True, CLASSES[:2]).tolist() == [
        ["0.600000:1:dog", "0.600000:3"],  # no label past the class names
        ["4.000000:0:cat", "3.000000:1:dog"],
    ]
    assert top_classes(scores, 9, True).shape == (2, 4)  # k is capped at the values there are
    ints = np.array([[250, 7, 255]], np.uint8)  # printed as integers, unsigned sorted right
    assert top_classes(ints, 2, True).tolist() == [["255:2", "250:0"]]
    nan = np.array([[np.nan, 1.0, -np.inf]], np.float64)  # NaN ranks last
    assert top_classes(nan, 3, True).tolist() == [["1.000000:1", "-inf:2", "nan:0"]]
    image = np.arange(12, dtype=np.float32).reshape(2, 3, 2)  # flattened per row
    assert top_classes(image, 1, True).tolist() == [["5.000000:5"], ["11.000000:5"]]
    assert top_classes(image, 2, False).tolist() == ["11.000000:11", "10.000000:10"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_asks_for_classes_and_reads_them(binary: bool) -> None:
    images = np.zeros((2, 3, 2, 2), np.uint8)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2),
        triton.InferRequestedOutput("logits", binary_data=binary),
    ]
    payload, length = triton.InferenceServerClient.generate_request_body(
        [triton_input("images", images, "UINT8", True)], outputs=outputs
    )
    codec = InferCodec("tiny", SIG, 8, CLASSES)
    parsed = codec.decode(payload, length)
    assert parsed.outputs == (
        RequestedOutput("probabilities", binary, 2),
        RequestedOutput("logits", binary, 0),
    )
    results = {
        "probabilities": np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32),
        "logits": np.ones((2, 4), np.float32),
    }
    for _ in range(2):  # a classification answer is never served from the header cache
        answer = triton_result(*codec.encode(parsed, results))
        classes = answer.as_numpy("probabilities")
        assert classes.shape == (2, 2) and answer.get_output("probabilities")["datatype"] == "BYTES"
        assert [[_text(v) for v in row] for row in classes.tolist()] == [
            ["0.400000:3:truck", "0.300000:2:ship"],
            ["0.700000:0:cat", "0.100000:1:dog"],
        ]
        np.testing.assert_array_equal(answer.as_numpy("logits"), results["logits"])
    assert not codec._answers


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_classification_of_a_non_batching_model_has_shape_k() -> None:
    request = InferRequest({}, 1, (), (RequestedOutput("scores", True, 4),))
    scores = np.array([[0.5, 0.25, 1.0], [2.0, 0.0, 0.125]])
    parts, length = encode_infer("m", request, {"scores": scores}, FIXED, ("a", "b", "c"))
    classes = triton_result(parts, length).as_numpy("scores")
    assert classes.tolist() == [b"2.000000:3", b"1.000000:2:c", b"0.500000:0:a", b"0.250000:1:b"]


# tritonclient's own requests --------------------------------------------------------------
def test_tritonclient_request_with_bytes_and_mixed_binary_decodes() -> None:
    signature = Signature(
        (
            TensorSpec("question", "BYTES", (-1,)),
            TensorSpec("context", "BYTES", (-1, 2)),
            TensorSpec("ids", "INT32", (-1, 3)),
        ),
        (TensorSpec("answer", "BYTES", (-1,)), TensorSpec("score", "FP32", (-1, 5))),
        True,
    )
    question = np.array(["what?", "où?"], dtype=object)
    context = np.array([[b"it", b"is"], [b"c'est", b""]], dtype=object)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    inputs = [
        triton_input("context", context, "BYTES", True),
        triton_input("question", question, "BYTES", False),
        triton_input("ids", ids, "INT32", True),
    ]
    outputs = [
        triton.InferRequestedOutput("score", class_count=3),
        triton.InferRequestedOutput("answer", binary_data=False),
    ]
    payload, length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="q-1", timeout=2000
    )
    parsed = InferCodec("qa", signature, 8).decode(payload, length)
    assert parsed.inputs["question"].tolist() == ["what?", "où?"]
    assert parsed.inputs["context"].tolist() == [["it", "is"], ["c'est", ""]]
    np.testing.assert_array_equal(parsed.inputs["ids"], ids)
    assert parsed.rows == 2 and parsed.request_id == "q-1" and parsed.timeout_us == 2000
    assert parsed.outputs == (RequestedOutput("score", True, 3), RequestedOutput("answer", False))


# the codec's header cache -----------------------------------------------------------------
def test_codec_reuses_repeated_headers_but_still_checks_sizes() -> None:
    codec = InferCodec("tiny", SIG, 8)
    header = body({"shape": [1, 3, 2, 2], "parameters": {"binary_data_size": 12}})
    first = codec.decode(header + bytes(range(12)), len(header))
    second = codec.decode(header + bytes(range(12, 24)), len(header))  # served from the cache
    assert first.inputs["images"].ravel().tolist() == list(range(12))
    assert second.inputs["images"].ravel().tolist() == list(range(12, 24))
    assert second[1:] == first[1:]
    with pytest.raises(ProtocolError, match="binary data runs past the body"):
        codec.decode(header + bytes(11), len(header))
    results = {"logits": np.ones((1, 4), np.float32), "probabilities": np.zeros((1, 4), np.float32)}
    outputs = (RequestedOutput("logits", True), RequestedOutput("probabilities", True))
    binary = second._replace(outputs=outputs)
    one, length = codec.encode(binary, results)
    two, _ = codec.encode(binary, results)
    assert one[0] is two[0] and json.loads(one[0])["outputs"][0]["shape"] == [1, 4]
    assert length == len(one[0]) and bytes(two[1]) == results["logits"].tobytes()


def test_codec_remembers_the_layout_of_several_binary_inputs() -> None:
    ids, mask = np.arange(6, dtype=np.int64).reshape(2, 3), np.ones((2, 3), bool)
    header, _ = infer_body(
        binary_entry("mask", "BOOL", [2, 3], 6), binary_entry("ids", "INT64", [2, 3], 48)
    )
    codec = InferCodec("text", TEXT, 8)
    for scale in (1, 2):  # the second body is decoded from the remembered layout
        parsed = codec.decode(header + mask.tobytes() + (ids * scale).tobytes(), len(header))
        assert list(parsed.inputs) == ["ids", "mask"] and parsed.group == ((3,), (3,))
        np.testing.assert_array_equal(parsed.inputs["ids"], ids * scale)
        np.testing.assert_array_equal(parsed.inputs["mask"], mask)
    assert len(codec._requests) == 1


def test_codec_does_not_remember_bytes_inputs() -> None:
    data = framed(b"a", b"b")
    payload, length = infer_body(binary_entry("text", "BYTES", [1, 2], len(data)), binary=data)
    codec = InferCodec("m", TEXTS, 8)
    assert codec.decode(payload, length).inputs["text"].tolist() == [["a", "b"]]
    assert not codec._requests


# every fixed-width datatype, any values ---------------------------------------------------
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    datatype=st.sampled_from([d for d in sorted(DATATYPES) if d != "BYTES"]),
    rows=st.integers(1, 4),
    data=st.data(),
)
def test_every_fixed_width_datatype_round_trips_json_and_binary(
    datatype: str, rows: int, data
) -> None:
    dtype = DATATYPES[datatype]
    array = data.draw(hnp.arrays(dtype, (rows, 3), elements={"allow_nan": False}))
    signature = Signature(
        (TensorSpec("x", datatype, (-1, 3)),), (TensorSpec("y", datatype, (-1, 3)),), True
    )
    as_json, _ = infer_body(
        {"name": "x", "datatype": datatype, "shape": [rows, 3], "data": array.tolist()}
    )
    as_binary, length = infer_body(
        binary_entry("x", datatype, [rows, 3], array.nbytes), binary=array.tobytes()
    )
    for payload, header_length in ((as_json, None), (as_binary, length)):
        parsed = decode_infer(payload, header_length, signature, 8)
        np.testing.assert_array_equal(parsed.inputs["x"], array)
        for binary in (True, False):
            request = parsed._replace(outputs=(RequestedOutput("y", binary),))
            parts, out_length = encode_infer("m", request, {"y": parsed.inputs["x"]}, signature)
            np.testing.assert_array_equal(triton_result(parts, out_length).as_numpy("y"), array)


# the OpenAPI document ---------------------------------------------------------------------
DOCUMENTED = {
    "tiny": SIG,
    "text": Signature(
        (
            TensorSpec("ids", "INT64", (-1, -1)),
            TensorSpec("mask", "BOOL", (-1, -1)),
            TensorSpec("query", "BYTES", (-1,)),
            TensorSpec("scale", "FP16", (-1, 2)),
        ),
        (*TEXT.outputs, TensorSpec("count", "UINT64", (-1,))),
        True,
    ),
    "fixed": FIXED,
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_infer_body_the_document_allows_is_answered(name: str) -> None:
    """What schemathesis generates from the document decodes, and its answer encodes."""
    import schemathesis
    from schemathesis import GenerationMode

    signature = DOCUMENTED[name]
    document = openapi.document(name, "0", signature, 8, "image" if name == "tiny" else None)
    operations = {
        result.ok().label: result.ok()
        for result in schemathesis.openapi.from_dict(document).get_all_operations()
    }
    assert ("POST /v1/classify" in operations) is (name == "tiny")
    seen = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        case=operations["POST /v2/models/{model_name}/infer"].as_strategy(GenerationMode.POSITIVE)
    )
    def answered(case) -> None:
        parsed = decode_infer(json.dumps(case.body).encode(), None, signature, 8)
        results = {s.name: _result(s, parsed.rows) for s in signature.outputs}
        encode_infer(name, parsed, results, signature, CLASSES)
        seen.add(parsed.rows)

    answered()
    assert seen == ({1} if name == "fixed" else {1, 2})


def _result(spec: TensorSpec, rows: int) -> np.ndarray:
    shape = [rows if d == -1 and i == 0 else 2 if d == -1 else d for i, d in enumerate(spec.shape)]
    if spec.datatype == "BYTES":
        return np.full(shape, "x", dtype=object)
    return np.ones(shape, DATATYPES[spec.datatype])


def test_document_example_is_answered() -> None:
    signature = DOCUMENTED["text"]
    document = openapi.document("text", "0", signature, 8)
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    example = infer["requestBody"]["content"]["application/json"]["example"]
    parsed = decode_infer(json.dumps(example).encode(), None, signature, 8)
    assert parsed.request_id == "example" and list(parsed.inputs) == [
        "ids",
        "mask",
        "query",
        "scale",
    ]


# classify helpers -------------------------------------------------------------------------
def test_preprocess_resizes_and_converts_channels() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (31, 17), 90).save(buffer, format="JPEG")
    rgb = preprocess(buffer.getvalue(), contract((3, 8, 6)).image)
    assert rgb.shape == (1, 3, 8, 6) and rgb.dtype == np.uint8
    assert abs(int(rgb.mean()) - 90) <= 2
    gray = preprocess(buffer.getvalue(), contract((1, 4, 4)).image)
    assert gray.shape == (1, 1, 4, 4)


def test_top_k_and_query() -> None:
    ranked = top_k(np.array([0.1, 0.6, 0.3]), ("a", "b", "c"), 2)
    assert [r["class"] for r in ranked] == ["b", "c"]
    assert parse_top_k("top_k=9", 3) == 3 and parse_top_k("", 10) == 5
    with pytest.raises(ProtocolError):
        parse_top_k("top_k=x", 3)


def test_multipart_without_file_part_is_refused() -> None:
    form = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n'
    with pytest.raises(ProtocolError, match="no file part"):
        image_bytes(form, "multipart/form-data; boundary=b")
