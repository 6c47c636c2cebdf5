"""Property tests below the HTTP layer: merge-then-split, the scheduler on a real model,
and the infer parser on arbitrary bytes and JSON (only ProtocolError, i.e. 400, may escape).

test_batching.py covers the queue's order and cap and test_protocol.py named bad bodies;
these add what any mix of sizes or any input must satisfy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.backends import load_backend
from serving.batching import BatchQueue, merge, split
from serving.contract import Signature, TensorSpec
from serving.metrics import Metrics
from serving.protocol import DATATYPES, InferCodec, ProtocolError, decode_infer
from serving.scheduler import Scheduler

LOGITS = TensorSpec("logits", "FP32", (-1, 4))
SIG = Signature(
    (TensorSpec("images", "UINT8", (-1, 3, 2, 2)),),
    (LOGITS, TensorSpec("probabilities", "FP32", (-1, 4))),
    True,
)
ROW = 12  # bytes per row of the images input
TEXTS = Signature((TensorSpec("text", "BYTES", (-1, 2)),), (TensorSpec("n", "INT32", (-1,)),), True)


# merge then split -------------------------------------------------------------------------------
@given(rows=st.lists(st.integers(1, 9), min_size=1, max_size=30))
def test_merge_then_split_gives_each_request_exactly_its_rows(rows: list[int]) -> None:
    # Every row carries (request, row) so a misplaced or duplicated row cannot go unnoticed.
    arrays = [np.array([[i, r] for r in range(n)], np.int64) for i, n in enumerate(rows)]
    batch = merge(arrays)
    outputs = {"same": batch, "doubled": batch * 2}
    parts = split(outputs, rows)
    assert len(parts) == len(rows)
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part["same"], arrays[i])
        np.testing.assert_array_equal(part["doubled"], arrays[i] * 2)


@given(rows=st.lists(st.integers(1, 9), min_size=1, max_size=10), off=st.sampled_from([-1, 1]))
def test_split_refuses_outputs_with_the_wrong_row_count(rows: list[int], off: int) -> None:
    total = sum(rows)
    with pytest.raises(ValueError, match="rows for a batch of"):
        split({"logits": np.zeros((total + off, 4))}, rows)


# the real scheduler on a real model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def backends(tiny_model: Path):
    """Three model instances; each example uses the first 1 to 3."""
    return [load_backend(tiny_model, "cpu", 1, None) for _ in range(3)]


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    session = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {"images": batch})[0]


async def _run_mix(backends: list, rows: list[int], max_batch: int) -> list:
    loop = asyncio.get_running_loop()
    metrics = Metrics("tiny", max_batch, backends[0].info)
    scheduler = Scheduler(backends, BatchQueue(max_batch, 0.0005), metrics, loop)
    scheduler.start()
    rng = np.random.default_rng(len(rows))
    arrays = [rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8) for n in rows]
    answers: list[list] = [[] for _ in rows]
    finished = asyncio.Event()

    def done_for(i: int):
        def done(outputs, error) -> None:
            answers[i].append((outputs, error))
            if all(answers):
                finished.set()

        return done

    for i, array in enumerate(arrays):  # one loop pass: they batch as the server would
        assert scheduler.submit({"images": array}, len(array), done_for(i), None)
    await asyncio.wait_for(finished.wait(), 30)
    await asyncio.sleep(0.01)  # a duplicate answer would arrive here
    scheduler.stop()
    return [(arrays[i], answers[i]) for i in range(len(rows))]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.integers(1, 8), min_size=1, max_size=24),
    max_batch=st.integers(8, 20),
    instances=st.integers(1, 3),
)
def test_scheduler_answers_each_request_once_with_its_own_rows(
    backends, reference, rows: list[int], max_batch: int, instances: int
) -> None:
    """With several instances, requests are also split among idle ones and joined again."""
    for array, answers in asyncio.run(_run_mix(backends[:instances], rows, max_batch)):
        assert len(answers) == 1, "a request was answered more than once"
        outputs, error = answers[0]
        assert error is None
        np.testing.assert_allclose(outputs["logits"], reference(array), rtol=1e-5, atol=1e-6)


# the parser on arbitrary input --------------------------------------------------------------------
def _binary_entry(name: str, datatype: str, shape: list, size: int) -> dict:
    parameters = {"binary_data_size": size}
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": parameters}


def _binary_body(rows: int, size: int, shape: list | None = None) -> tuple[bytes, int]:
    entry = _binary_entry("images", "UINT8", shape or [rows, 3, 2, 2], size)
    header = json.dumps({"inputs": [entry]}).encode()
    return header, len(header)


def _framed(items: list[bytes]) -> bytes:
    """BYTES elements as the binary extension frames them: 4-byte length, then the bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def _decode_or_400(body: bytes, header_length: int | None, signature: Signature = SIG):
    """What the server does with a body: a parsed request or ProtocolError (400), nothing else."""
    try:
        return InferCodec("tiny", signature, 8).decode(body, header_length)
    except ProtocolError:
        return None


@given(
    rows=st.integers(1, 8),
    declared=st.integers(-(2**63), 2**63),
    tail=st.binary(max_size=200),
    header_length=st.one_of(st.none(), st.integers(0, 400)),
)
def test_binary_sizes_that_do_not_add_up_are_400_never_a_crash(
    rows: int, declared: int, tail: bytes, header_length: int | None
) -> None:
    header, length = _binary_body(rows, declared)
    parsed = _decode_or_400(header + tail, length if header_length is None else header_length)
    if parsed is not None:  # only a consistent body may parse, and then to exactly its bytes
        assert parsed.inputs["images"].nbytes == len(tail) == declared == rows * ROW


@given(rows=st.integers(1, 8), data=st.data())
def test_well_formed_binary_bodies_parse_to_exactly_their_bytes(rows: int, data) -> None:
    pixels = data.draw(st.binary(min_size=rows * ROW, max_size=rows * ROW))
    header, length = _binary_body(rows, rows * ROW)
    codec = InferCodec("tiny", SIG, 8)
    for _ in range(2):  # the second decode comes from the codec's header cache
        parsed = codec.decode(header + pixels, length)
        assert parsed.inputs["images"].shape == (rows, 3, 2, 2)
        assert parsed.inputs["images"].tobytes() == pixels and parsed.rows == rows


@given(body=st.binary(max_size=300), header_length=st.one_of(st.none(), st.integers(0, 400)))
def test_arbitrary_bytes_are_400_never_a_crash(body: bytes, header_length: int | None) -> None:
    _decode_or_400(body, header_length)


@given(
    declared=st.integers(-5, 300),
    tail=st.one_of(
        st.binary(max_size=120),
        st.lists(st.binary(max_size=20), max_size=6).map(_framed),
    ),
    rows=st.integers(1, 3),
)
def test_arbitrary_bytes_framing_is_400_never_a_crash(
    declared: int, tail: bytes, rows: int
) -> None:
    header = json.dumps({"inputs": [_binary_entry("text", "BYTES", [rows, 2], declared)]})
    parsed = _decode_or_400(header.encode() + tail, len(header), TEXTS)
    if parsed is not None:  # then the framing adds up, and to exactly its elements
        assert declared == len(tail) and parsed.inputs["text"].shape == (rows, 2)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    field=st.sampled_from(["name", "shape", "datatype", "data", "parameters"]),
    value=JSON,
    outputs=st.one_of(
        st.just(None),
        JSON,
        st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), JSON)),
    ),
    parameters=st.one_of(st.just(None), JSON),
)
def test_any_json_in_any_field_is_400_never_a_crash(field, value, outputs, parameters) -> None:
    entry = {"name": "images", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [0] * ROW}
    entry[field] = value
    request: dict = {"inputs": [entry]}
    if outputs is not None:
        request["outputs"] = outputs
    if parameters is not None:
        request["parameters"] = parameters
    _decode_or_400(json.dumps(request).encode(), None)


@given(
    datatype=st.sampled_from(sorted(DATATYPES)),
    index=st.integers(0, 1),
    field=st.sampled_from(["name", "shape", "datatype", "data"]),
    value=JSON,
)
def test_any_json_in_a_multi_input_request_is_400_never_a_crash(
    datatype: str, index: int, field: str, value
) -> None:
    signature = Signature(
        (TensorSpec("a", datatype, (-1, 2)), TensorSpec("b", "BYTES", (-1, -1))), (), True
    )
    entries = [
        {"name": "a", "shape": [1, 2], "datatype": datatype, "data": [0, 0]},
        {"name": "b", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]},
    ]
    entries[index][field] = value
    _decode_or_400(json.dumps({"inputs": entries}).encode(), None, signature)


def test_deeply_nested_json_is_400() -> None:
    with pytest.raises(ProtocolError, match="malformed JSON"):
        decode_infer(b"[" * 100_000 + b"]" * 100_000, None, SIG, 8)


def test_fp32_inputs_refuse_strings_with_400() -> None:
    signature = Signature((TensorSpec("x", "FP32", (-1, 2)),), (LOGITS,), True)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": ["a", "b"]}]}
    )
    with pytest.raises(ProtocolError, match="'x' data must be numbers for FP32"):
        decode_infer(body.encode(), None, signature, 8)
