"""JSON/binary codec edge cases below the HTTP layer, and the classify helpers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from serving.classify import image_bytes, parse_top_k, preprocess, top_k
from serving.protocol import InferRequest, ProtocolError, TensorSpec, decode_infer, encode_infer
from tests.serving.serving_helpers import contract

SPEC = TensorSpec("images", "UINT8", (-1, 3, 2, 2))
OUTS = (TensorSpec("logits", "FP32", (-1, 4)), TensorSpec("probabilities", "FP32", (-1, 4)))


def body(entry: dict, **request) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "images", "datatype": "UINT8", **entry}], **request}
    ).encode()


def test_json_nested_data_and_output_selection() -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)
    outputs = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    payload = body({"shape": [2, 3, 2, 2], "data": data.tolist()}, id="x", outputs=outputs)
    parsed = decode_infer(payload, None, SPEC, OUTS, 8)
    np.testing.assert_array_equal(parsed.array, data)
    assert parsed.outputs == (("probabilities", True),) and parsed.request_id == "x"


def test_binary_input_and_binary_output_default() -> None:
    header = body(
        {"shape": [1, 3, 2, 2], "parameters": {"binary_data_size": 12}},
        parameters={"binary_data_output": True, "timeout": 500},
    )
    parsed = decode_infer(header + bytes(range(12)), len(header), SPEC, OUTS, 8)
    assert parsed.array.tolist() == np.arange(12).reshape(1, 3, 2, 2).tolist()
    assert parsed.outputs == (("logits", True), ("probabilities", True))
    assert parsed.timeout_us == 500


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (body({"shape": [1, 3, 2, 2], "data": [1.5] * 12}), "must be integers"),
        (body({"shape": [1, 3, 2, 2], "data": [300] * 12}), "out of range"),
        (body({"shape": [1, 3, 2, 2], "data": [[1, 2], [3]]}), "ragged"),
        (body({"shape": "1x3x2x2", "data": []}), "shape list"),
        (body({"shape": [0, 3, 2, 2], "data": []}), "batch 0"),
        (body({"shape": [1, 3, 2, 2]}), "neither 'data' nor binary_data_size"),
        (
            body({"shape": [1, 3, 2, 2], "data": [0] * 12}, parameters={"timeout": "soon"}),
            "timeout",
        ),
        (json.dumps({"inputs": []}).encode(), "exactly one input"),
        (json.dumps({"inputs": "images"}).encode(), "'inputs' list"),
        (
            body({"shape": [1, 3, 2, 2], "data": [0] * 12}, outputs="logits"),
            "'outputs' must be a list",
        ),
    ],
)
def test_bad_requests_name_the_problem(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode_infer(payload, None, SPEC, OUTS, 8)


def test_encode_mixes_json_and_binary_outputs() -> None:
    results = {
        "logits": np.arange(8, dtype=np.float32).reshape(2, 4),
        "probabilities": np.ones((2, 4), np.float32),
    }
    request = InferRequest(
        np.zeros((2, 3, 2, 2), np.uint8), (("logits", False), ("probabilities", True)), "id-7"
    )
    parts, header_length = encode_infer(
        "tiny", request, results, {"logits": "FP32", "probabilities": "FP32"}
    )
    header = json.loads(parts[0])
    assert header_length == len(parts[0]) and header["id"] == "id-7"
    assert header["outputs"][0]["data"] == list(range(8))
    assert header["outputs"][1]["parameters"]["binary_data_size"] == 32
    assert bytes(parts[1]) == np.ones((2, 4), np.float32).tobytes()


def test_encode_all_json_has_no_header_length() -> None:
    request = InferRequest(np.zeros((1, 3, 2, 2), np.uint8), (("logits", False),))
    parts, header_length = encode_infer(
        "tiny", request, {"logits": np.zeros((1, 4), np.float32)}, {"logits": "FP32"}
    )
    assert header_length is None and len(parts) == 1


# classify helpers
def test_preprocess_resizes_and_converts_channels() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (31, 17), 90).save(buffer, format="JPEG")
    rgb = preprocess(buffer.getvalue(), contract((3, 8, 6)))
    assert rgb.shape == (1, 3, 8, 6) and rgb.dtype == np.uint8
    assert abs(int(rgb.mean()) - 90) <= 2
    gray = preprocess(buffer.getvalue(), contract((1, 4, 4)))
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


def test_codec_reuses_repeated_headers_but_still_checks_sizes() -> None:
    from serving.protocol import InferCodec

    codec = InferCodec("tiny", SPEC, OUTS, 8)
    header = body({"shape": [1, 3, 2, 2], "parameters": {"binary_data_size": 12}})
    first = codec.decode(header + bytes(range(12)), len(header))
    second = codec.decode(header + bytes(range(12, 24)), len(header))  # served from the cache
    assert first.array.ravel().tolist() == list(range(12))
    assert second.array.ravel().tolist() == list(range(12, 24))
    with pytest.raises(ProtocolError, match="binary data runs past the body"):
        codec.decode(header + bytes(11), len(header))
    results = {"logits": np.ones((1, 4), np.float32), "probabilities": np.zeros((1, 4), np.float32)}
    binary = InferRequest(second.array, (("logits", True), ("probabilities", True)))
    one, length = codec.encode(binary, results)
    two, _ = codec.encode(binary, results)
    assert one[0] is two[0] and json.loads(one[0])["outputs"][0]["shape"] == [1, 4]
    assert length == len(one[0]) and bytes(two[1]) == results["logits"].tobytes()
