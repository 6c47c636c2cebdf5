"""Serving models no tensorferry stage wrote: the real server process, tritonclient and
KServe's client, each answer checked against onnxruntime called directly."""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from serving.contract import V1_KEYS
from tests.serving import any_models
from tests.serving.serving_helpers import (
    CLASSES,
    ServerProcess,
    build_model,
    contract,
    fetch,
    images,
    start_server,
)

pytestmark = pytest.mark.timeout(120)

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "two_in_three_out": any_models.two_inputs_three_outputs,
    "every_datatype": any_models.every_datatype,
    "no_batch_dim": any_models.no_batch_dim,
    "dynamic_length": any_models.dynamic_length,
    "strings": any_models.strings,
    "torch_cnn": any_models.torch_cnn,
    "torch_gru": any_models.torch_gru,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("any")
    return {name: build(directory / f"{name}.onnx") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def serve(models: dict[str, Path]) -> Iterator[Callable[[str], ServerProcess]]:
    """A server per model, started on first use and stopped (exit 0) with the module."""
    running: dict[str, ServerProcess] = {}

    def get(name: str) -> ServerProcess:
        if name not in running:
            running[name] = start_server(models[name], "--threads", "1", "--max-batch-size", "16")
        return running[name]

    yield get
    for server in running.values():
        assert server.terminate() == 0, "\n".join(server.log)


def client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.host_port, concurrency=4)


def direct(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def infer(
    server: ServerProcess,
    name: str,
    inputs: dict[str, np.ndarray],
    binary: bool = True,
    outputs: list[str] | None = None,
) -> httpclient.InferResult:
    tensors = []
    for key, value in inputs.items():
        datatype = "BYTES" if value.dtype == object else _triton_type(value.dtype)
        tensor = httpclient.InferInput(key, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        tensors.append(tensor)
    wanted = None
    if outputs is not None:
        wanted = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return client(server).infer(name, tensors, outputs=wanted)


def _triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def assert_same(result: httpclient.InferResult, expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got is not None, f"no output {name}"
        if want.dtype == object:  # tritonclient hands BYTES back as bytes
            got = np.vectorize(lambda b: b.decode(), otypes=[object])(got)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        close(got, want, name)


def close(got: np.ndarray, want: np.ndarray, name: str = "") -> None:
    """Exact for integers, booleans and strings; floats to a few ulps, since a session with
    other thread settings may sum in another order."""
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


def random_inputs(metadata: dict, rows: int, seed: int = 0) -> dict:
    """Inputs for a model's metadata (``/v2/models/m``): ``rows`` rows, other dynamic dims 4."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in metadata["inputs"]:
        shape = [
            rows if i == 0 and d == -1 else 4 if d == -1 else d for i, d in enumerate(spec["shape"])
        ]
        inputs[spec["name"]] = _values(spec["datatype"], shape, rng)
    return inputs


def _values(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        words = np.array(["spam", "ham", "naïve ☃", ""], dtype=object)
        return words[rng.integers(0, len(words), shape)]
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = triton_to_np_dtype(datatype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# Signature and config


def test_the_signature_comes_from_the_graph(serve, models) -> None:
    server = serve("two_in_three_out")
    c = client(server)
    meta = c.get_model_metadata("two_in_three_out")  # named after the file
    assert meta["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "counts", "datatype": "INT64", "shape": [-1, 2]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["total", "doubled", "next_counts"]
    config = c.get_model_config("two_in_three_out")
    assert config["max_batch_size"] == 16
    assert config["input"] == [
        {"name": "features", "data_type": "TYPE_FP32", "dims": [3]},
        {"name": "counts", "data_type": "TYPE_INT64", "dims": [2]},
    ]
    assert config["output"][2] == {"name": "next_counts", "data_type": "TYPE_INT64", "dims": [2]}
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert "dynamic_batching" in config and config["parameters"] == {}
    assert any("features FP32 [-1, 3]" in line and "batching" in line for line in server.log)


def test_a_model_without_a_batch_dim_takes_full_shapes(serve, models) -> None:
    server = serve("no_batch_dim")
    config = client(server).get_model_config("no_batch_dim")
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3, 4]}]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_same(infer(server, "no_batch_dim", {"x": x}), direct(models["no_batch_dim"], {"x": x}))
    with pytest.raises(InferenceServerException, match="'x'") as info:
        infer(server, "no_batch_dim", {"x": x[None]})
    assert info.value.status() == "400"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_request_built_from_the_config_alone_is_answered(serve, models, name: str) -> None:
    """What perf_analyzer does: read dims, data types and max_batch_size, fill, send."""
    server = serve(name)
    config = client(server).get_model_config(name)
    rows = 3 if config["max_batch_size"] else None
    inputs = {}
    rng = np.random.default_rng(1)
    for tensor in config["input"]:
        datatype = tensor["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
        dims = [4 if d == -1 else d for d in tensor["dims"]]
        inputs[tensor["name"]] = _values(datatype, [rows, *dims] if rows else dims, rng)
    if name == "torch_gru":
        inputs["ids"] = np.abs(inputs["ids"]) % 50  # embedding ids
    assert_same(infer(server, name, inputs), direct(models[name], inputs))


# Tensors


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_two_inputs_and_a_chosen_subset_of_three_outputs(serve, models, binary: bool) -> None:
    server = serve("two_in_three_out")
    inputs = {
        "features": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
        "counts": np.arange(10, dtype=np.int64).reshape(5, 2),
    }
    expected = direct(models["two_in_three_out"], inputs)
    result = infer(server, "two_in_three_out", inputs, binary, ["next_counts", "total"])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["next_counts", "total"]
    assert_same(result, {k: expected[k] for k in ("next_counts", "total")})
    assert result.as_numpy("doubled") is None


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(serve, models, binary: bool) -> None:
    server = serve("every_datatype")
    meta = client(server).get_model_metadata("every_datatype")
    inputs = random_inputs(meta, rows=3, seed=int(binary))
    result = infer(server, "every_datatype", inputs, binary)
    assert_same(result, direct(models["every_datatype"], inputs))
    datatypes = {o["name"]: o["datatype"] for o in result.get_response()["outputs"]}
    assert datatypes == {f"out_{t}": t for t in any_models.ONNX_TYPES}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_string_model_takes_and_returns_bytes(serve, models, binary: bool) -> None:
    server = serve("strings")
    text = np.array([["spam"], ["ham"], ["naïve ☃"], [""]], dtype=object)
    result = infer(server, "strings", {"text": text}, binary)
    assert_same(result, direct(models["strings"], {"text": text}))
    assert result.as_numpy("is_spam").ravel().tolist() == [True, False, False, False]


def test_torch_exports_serve_as_exported(serve, models) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    cnn = infer(serve("torch_cnn"), "torch_cnn", {"pixels": pixels})
    assert_same(cnn, direct(models["torch_cnn"], {"pixels": pixels}))
    ids = rng.integers(0, 50, (3, 9)).astype(np.int64)
    mask = (np.arange(9) < np.array([[9], [5], [2]])).astype(np.int64)
    gru = infer(serve("torch_gru"), "torch_gru", {"ids": ids, "mask": mask}, binary=False)
    assert_same(gru, direct(models["torch_gru"], {"ids": ids, "mask": mask}))


def test_kserve_client_serves_the_gru(serve, models) -> None:
    import asyncio

    _argv, sys.argv = sys.argv, sys.argv[:1]  # importing kserve parses sys.argv
    try:
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    finally:
        sys.argv = _argv
    server = serve("torch_gru")
    ids = np.random.default_rng(3).integers(0, 50, (2, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    tensors = []
    for name, value in (("ids", ids), ("mask", mask)):
        tensor = InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value, binary_data=name == "ids")
        tensors.append(tensor)

    async def call() -> dict[str, np.ndarray]:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as kserve:
            request = InferRequest("torch_gru", tensors)
            answer = await kserve.infer(server.url, request, model_name="torch_gru")
        return {o.name: o.as_numpy() for o in answer.outputs}

    got = asyncio.run(call())
    want = direct(models["torch_gru"], {"ids": ids, "mask": mask})
    close(got["logits"], want["logits"])


# Triton's classification extension


def _classes(server: ServerProcess, name: str, inputs: dict, output: str, k: int) -> list:
    tensors = []
    for key, value in inputs.items():
        tensor = httpclient.InferInput(key, list(value.shape), _triton_type(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    wanted = [httpclient.InferRequestedOutput(output, class_count=k)]
    result = client(server).infer(name, tensors, outputs=wanted)
    return [[entry.decode().split(":") for entry in row] for row in result.as_numpy(output)]


def test_class_count_returns_triton_classification_strings(serve, models, tiny_model) -> None:
    pixels = np.random.default_rng(4).standard_normal((2, 1, 8, 8)).astype(np.float32)
    scores = direct(models["torch_cnn"], {"pixels": pixels})["scores"]
    rows = _classes(serve("torch_cnn"), "torch_cnn", {"pixels": pixels}, "scores", 2)
    for row, want in zip(rows, scores, strict=True):  # no labels: "value:index"
        order = np.argsort(-want)[:2]
        assert [int(index) for _, index in row] == order.tolist()
        np.testing.assert_allclose([float(v) for v, _ in row], want[order], atol=1e-6)
    labelled = start_server(tiny_model, "--threads", "1")
    try:
        batch = images(3)
        probabilities = direct(tiny_model, {"images": batch})["probabilities"]
        rows = _classes(labelled, "tiny", {"images": batch}, "probabilities", 9)
    finally:
        assert labelled.terminate() == 0
    for row, want in zip(rows, probabilities, strict=True):  # k capped at the 4 classes
        order = np.argsort(-want)
        assert [(int(i), label) for _, i, label in row] == [(i, CLASSES[i]) for i in order]


# Batching requests of several shapes


def test_mixed_lengths_under_concurrent_load_each_get_their_own_rows(serve, models) -> None:
    server = serve("dynamic_length")
    session = ort.InferenceSession(
        str(models["dynamic_length"]), providers=["CPUExecutionProvider"]
    )
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        own = httpclient.InferenceServerClient(server.host_port)
        for _ in range(15):
            x = rng.standard_normal((int(rng.integers(1, 4)), int(rng.choice([2, 5, 9])))).astype(
                np.float32
            )
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = own.infer("dynamic_length", [tensor])
            total, doubled = session.run(["total", "doubled"], {"x": x})
            try:
                close(result.as_numpy("total"), total)
                close(result.as_numpy("doubled"), doubled)
            except AssertionError:
                failures.append(f"seed {seed}: shape {x.shape} got another request's rows")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    stats = client(server).get_inference_statistics("dynamic_length")["model_stats"][0]
    assert stats["inference_count"] >= 16 * 15  # rows
    assert stats["execution_count"] < 16 * 15 + 16, stats  # some requests shared a batch


# Image routes


def test_classify_is_only_for_image_and_text_classifiers(serve, tiny_model) -> None:
    server = serve("torch_cnn")
    status, _, body = fetch(server, "/v1/classify", b"\x89PNG")
    assert status == 404
    message = json.loads(body)["error"]
    assert (
        "image, text and tabular classifiers" in message and "/v2/models/torch_cnn/infer" in message
    )


def test_models_exported_with_contract_version_1_still_serve(tmp_path: Path) -> None:
    current = contract().to_metadata()
    v1 = {
        "tensorferry.model_name": "tiny",
        "tensorferry.class_names": current["tensorferry.class_names"],
        "tensorferry.precision": "fp32",
        **dict(zip(V1_KEYS, ["images", "NCHW", "[3, 8, 8]", "uint8", "[0, 255]"], strict=True)),
    }
    model = build_model(tmp_path / "old.onnx", metadata=v1)
    server = start_server(model, "--threads", "1")
    try:
        from PIL import Image

        png = io.BytesIO()
        Image.fromarray(images(1)[0].transpose(1, 2, 0)).save(png, "PNG")
        status, _, body = fetch(server, "/v1/classify?top_k=2", png.getvalue())
        assert status == 200 and json.loads(body)["model_name"] == "tiny"
        batch = images(2)
        assert_same(infer(server, "tiny", {"images": batch}), direct(model, {"images": batch}))
    finally:
        assert server.terminate() == 0


# Bad input: 400 naming the tensor, and the server keeps serving everyone else


def _json_body(*tensors: tuple[str, str, list, list]) -> bytes:
    inputs = [
        {"name": name, "datatype": datatype, "shape": shape, "data": data}
        for name, datatype, shape, data in tensors
    ]
    return json.dumps({"inputs": inputs}).encode()


FEATURES = ("features", "FP32", [1, 3], [0.5, 1.5, 2.5])
COUNTS = ("counts", "INT64", [1, 2], [1, 2])
BAD_REQUESTS = {
    "missing-input": ("two_in_three_out", _json_body(FEATURES), {}, "counts"),
    "unknown-name": (
        "two_in_three_out",
        _json_body(FEATURES, COUNTS, ("extra", "FP32", [1], [0.0])),
        {},
        "extra",
    ),
    "wrong-datatype": (
        "two_in_three_out",
        _json_body(("features", "FP64", [1, 3], [0.5, 1.5, 2.5]), COUNTS),
        {},
        "features",
    ),
    "fixed-dim": (
        "two_in_three_out",
        _json_body(("features", "FP32", [1, 4], [0.0] * 4), COUNTS),
        {},
        "features",
    ),
    "batch-sizes-disagree": (
        "two_in_three_out",
        _json_body(("features", "FP32", [2, 3], [0.0] * 6), COUNTS),
        {},
        "counts",
    ),
    "strings-to-numeric": (
        "two_in_three_out",
        _json_body(("features", "FP32", [1, 3], ["a", "b", "c"]), COUNTS),
        {},
        "features",
    ),
    "numbers-to-bytes": ("strings", _json_body(("text", "BYTES", [1, 1], [7])), {}, "text"),
}


def _bytes_framing_that_does_not_add_up() -> tuple[bytes, dict]:
    tensor = (100).to_bytes(4, "little") + b"spam"  # an element claiming 100 bytes in 8
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ]
        }
    ).encode()
    return header + tensor, {"Inference-Header-Content-Length": str(len(header))}


BAD_REQUESTS["bytes-framing"] = ("strings", *_bytes_framing_that_does_not_add_up(), "text")


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_400_naming_the_tensor(serve, case: str) -> None:
    name, body, headers, tensor = BAD_REQUESTS[case]
    server = serve(name)
    status, _, answer = fetch(server, f"/v2/models/{name}/infer", body, headers)
    assert status == 400, answer
    assert f"'{tensor}'" in json.loads(answer)["error"]
    assert client(server).is_server_ready()


def test_bad_requests_among_good_ones_cost_the_good_ones_nothing(serve, models) -> None:
    server = serve("two_in_three_out")
    good = {"features": np.ones((1, 3), np.float32), "counts": np.ones((1, 2), np.int64)}
    want = direct(models["two_in_three_out"], good)
    statuses: list[int] = []
    wrong: list[str] = []

    def bad_sender() -> None:
        for case in ("fixed-dim", "batch-sizes-disagree", "strings-to-numeric"):
            for _ in range(10):
                _, body, headers, _ = BAD_REQUESTS[case]
                statuses.append(fetch(server, "/v2/models/two_in_three_out/infer", body)[0])

    def good_sender() -> None:
        for _ in range(30):
            result = infer(server, "two_in_three_out", good)
            if not np.array_equal(result.as_numpy("total"), want["total"]):
                wrong.append("a good request got a wrong answer")

    threads = [threading.Thread(target=f) for f in (bad_sender, good_sender, good_sender)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(statuses) == {400} and len(statuses) == 30
    assert wrong == []
