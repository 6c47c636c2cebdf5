"""Sequence models through the real server: ids and mask (or series and mask) over /v2 with
tritonclient, requests of different lengths in one batch (pad-merge), raw text on
/v1/classify; each answer checked against onnxruntime called directly on the request alone."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.serving import sequence_models
from tests.serving.serving_helpers import ServerProcess, fetch, start_server

pytestmark = pytest.mark.timeout(120)

MAX_BATCH = 16


@pytest.fixture(scope="module")
def tokenizer() -> str:
    return sequence_models.tokenizer_json()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: str) -> Path:
    return sequence_models.text_gru(tmp_path_factory.mktemp("seq") / "sms.onnx", tokenizer)


@pytest.fixture(scope="module")
def series_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sequence_models.series_mlp(tmp_path_factory.mktemp("seq") / "sensor.onnx")


def _server(model: Path, *args: str, env: dict | None = None) -> ServerProcess:
    # A long queue delay: requests that queue behind a batch wait for company, so the
    # concurrent ones below merge into mixed-length batches on a CPU of any speed.
    common = ("--threads", "1", "--max-batch-size", str(MAX_BATCH), "--max-queue-delay-us")
    return start_server(model, *common, "20000", *args, env=env)


@pytest.fixture(scope="module")
def text_server(text_model: Path) -> Iterator[ServerProcess]:
    server = _server(text_model, "--sequence-batching", "pad")
    yield server
    assert server.terminate() == 0, "\n".join(server.log)


@pytest.fixture(scope="module")
def bucket_server(text_model: Path) -> Iterator[ServerProcess]:
    server = _server(text_model)  # the default policy
    yield server
    assert server.terminate() == 0, "\n".join(server.log)


@pytest.fixture(scope="module")
def series_server(series_model: Path) -> Iterator[ServerProcess]:
    server = _server(series_model, env={"TENSORFERRY_SEQUENCE_BATCHING": "equal"})
    yield server
    assert server.terminate() == 0, "\n".join(server.log)


def direct(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip(["logits", "probabilities"], session.run(None, inputs), strict=True))


def tensors(inputs: dict[str, np.ndarray], binary: bool = True) -> list[httpclient.InferInput]:
    out = []
    for name, value in inputs.items():
        tensor = httpclient.InferInput(
            name, list(value.shape), "FP32" if value.dtype.kind == "f" else "INT64"
        )
        tensor.set_data_from_numpy(value, binary_data=binary)
        out.append(tensor)
    return out


def ids_and_mask(length: int, rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 60, (rows, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def batches(server: ServerProcess) -> tuple[float, float]:
    """(rows, backend runs) so far, from /metrics."""
    body = fetch(server, "/metrics")[2].decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{.*\}} (\S+)$", body, re.M))

    return total("tensorferry_inference_count_total"), total("tensorferry_execution_count_total")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_ids_and_mask_through_tritonclient_equal_onnxruntime(
    text_server: ServerProcess, text_model: Path, binary: bool
) -> None:
    inputs = ids_and_mask(7, rows=3)
    inputs["attention_mask"][1, 4:] = 0  # a row padded by the client itself
    client = httpclient.InferenceServerClient(text_server.host_port)
    result = client.infer("sms", tensors(inputs, binary))
    for name, want in direct(text_model, inputs).items():
        np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-6)


def pipelined(server: ServerProcess, model: str, requests: list[dict]) -> list:
    """Every request sent in one write on one connection (tritonclient's own bodies), so
    the server reads them in one event-loop pass and they queue together: batching is
    then decided by the policy alone, not by how fast the client sends."""
    wire = b""
    for inputs in requests:
        body, json_size = httpclient.InferenceServerClient.generate_request_body(tensors(inputs))
        head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\n"
        head += f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {json_size}\r\n"
        wire += head.encode() + b"\r\n" + body
    results = []
    with socket.create_connection(server.host_port.split(":"), timeout=30) as sock:
        sock.sendall(wire)
        data = b""
        while len(results) < len(requests):
            head, sep, rest = data.partition(b"\r\n\r\n")
            fields = dict(
                line.split(": ", 1) for line in head.decode().lower().split("\r\n")[1:] if sep
            )
            size = int(fields.get("content-length", -1))
            if not sep or len(rest) < size:
                data += sock.recv(1 << 16)
                continue
            assert head.startswith(b"HTTP/1.1 200"), head + rest[:size]
            length = fields.get("inference-header-content-length")
            results.append(
                httpclient.InferenceServerClient.parse_response_body(
                    rest[:size], header_length=None if length is None else int(length)
                )
            )
            data = rest[size:]
    return results


@pytest.mark.parametrize(("policy", "most_runs"), [("pad", 6), ("bucket", 12)])
def test_mixed_lengths_share_batches_and_answer_as_alone(
    request: pytest.FixtureRequest, text_model: Path, policy: str, most_runs: int
) -> None:
    server = request.getfixturevalue("text_server" if policy == "pad" else "bucket_server")
    config = json.loads(fetch(server, "/v2/models/sms/config")[2])
    assert config["parameters"]["tensorferry.batching"]["string_value"] == policy
    lengths = [1, 3, 32, 5, 2, 17, 9, 4, 30, 1, 6, 12, 8, 2, 25, 3, 11, 7, 4, 19, 2, 1, 14, 5]
    requests = [ids_and_mask(n, rows=1 + i % 2, seed=i) for i, n in enumerate(lengths)]
    rows_before, runs_before = batches(server)
    results = pipelined(server, "sms", requests)
    rows, runs = batches(server)
    # 36 rows of 20 distinct lengths in 16-row batches. pad: 3 runs (a few more if the
    # first read ends early); bucket: one or two per length class (7 classes); equal
    # shapes only would take a run per length (20).
    assert rows - rows_before == 36 and runs - runs_before <= most_runs, runs - runs_before
    for request, result in zip(requests, results, strict=True):
        alone = direct(text_model, request)
        got = result.as_numpy("probabilities")
        assert np.abs(got - alone["probabilities"]).max() <= 1e-5
        assert np.abs(result.as_numpy("logits") - alone["logits"]).max() <= 1e-5
        assert (got.argmax(1) == alone["probabilities"].argmax(1)).all()


def test_equal_policy_batches_only_equal_lengths(
    series_server: ServerProcess, series_model: Path
) -> None:
    rng = np.random.default_rng(5)
    requests = []
    for length in (4, 9, 4, 9, 4, 30):
        series = rng.standard_normal((1, 2, length)).astype(np.float32)
        requests.append({"series": series, "mask": np.ones((1, length), np.int64)})
    runs_before = batches(series_server)[1]
    results = pipelined(series_server, "sensor", requests)
    assert batches(series_server)[1] - runs_before >= 3  # one group per length
    for request, result in zip(requests, results, strict=True):
        for name, want in direct(series_model, request).items():
            np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-6)


def test_series_and_mask_equal_onnxruntime(
    series_server: ServerProcess, series_model: Path
) -> None:
    client = httpclient.InferenceServerClient(series_server.host_port, concurrency=4)
    rng = np.random.default_rng(3)
    requests = []
    for length in (4, 9, 4, 30):
        series = rng.standard_normal((2, 2, length)).astype(np.float32)
        requests.append({"series": series, "mask": np.ones((2, length), np.int64)})
    pending = [client.async_infer("sensor", tensors(r)) for r in requests]
    for request, waiting in zip(requests, pending, strict=True):
        result = waiting.get_result()
        for name, want in direct(series_model, request).items():
            np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-6)


def test_config_and_metadata_describe_the_sequence_model(
    text_server: ServerProcess, series_server: ServerProcess
) -> None:
    status, _, body = fetch(text_server, "/v2/models/sms")
    metadata = json.loads(body)
    assert status == 200
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {
        "input_ids": [-1, -1],
        "attention_mask": [-1, -1],
    }
    config = json.loads(fetch(text_server, "/v2/models/sms/config")[2])
    assert config["max_batch_size"] == MAX_BATCH
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input_ids", "TYPE_INT64", [-1]),
        ("attention_mask", "TYPE_INT64", [-1]),
    ]
    assert config["output"][1]["dims"] == [3]
    assert config["parameters"]["tensorferry.batching"]["string_value"] == "pad"
    assert config["parameters"]["tensorferry.task"]["string_value"] == "sequence_classification"
    series_config = json.loads(fetch(series_server, "/v2/models/sensor/config")[2])
    assert series_config["input"][0]["dims"] == [2, -1]
    assert series_config["parameters"]["tensorferry.batching"]["string_value"] == "equal"
    assert any("sequence batching: equal" in line for line in series_server.log)
    document = json.loads(fetch(text_server, "/v2/openapi.json")[2])
    classify = document["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(classify) == {"application/json", "text/plain"}
    series_document = json.loads(fetch(series_server, "/v2/openapi.json")[2])
    assert "/v1/classify" not in series_document["paths"]


def test_classification_extension_labels_text_classes(text_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(text_server.host_port)
    wanted = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    result = client.infer("sms", tensors(ids_and_mask(6)), outputs=wanted)
    top = [v.decode().split(":") for v in result.as_numpy("probabilities")[0]]
    assert [label for _, _, label in top] != [] and all(
        sequence_models.TEXT_CLASSES[int(i)] == label for _, i, label in top
    )


def _classify(server: ServerProcess, body: bytes, content_type: str, query: str = ""):
    status, _, answer = fetch(server, "/v1/classify" + query, body, {"Content-Type": content_type})
    return status, json.loads(answer)


def _expected(model: Path, tokenizer: str, texts: list[str]) -> np.ndarray:
    ids, mask = sequence_models.encode(tokenizer, texts)
    return direct(model, {"input_ids": ids, "attention_mask": mask})["probabilities"]


def test_classify_raw_text_json_and_plain(
    text_server: ServerProcess, text_model: Path, tokenizer: str
) -> None:
    texts = ["Win a FREE prize now", "see you at six", "zzz qqq " * 40]  # the last is truncated
    status, one = _classify(
        text_server, json.dumps({"text": texts[0]}).encode(), "application/json"
    )
    assert status == 200, one
    want = _expected(text_model, tokenizer, texts[:1])[0]
    assert one["model_name"] == "sms"
    assert [p["class"] for p in one["predictions"]] == [
        sequence_models.TEXT_CLASSES[i] for i in np.argsort(-want, kind="stable")
    ]
    assert one["predictions"][0]["probability"] == pytest.approx(float(want.max()), abs=1e-6)
    status, plain = _classify(
        text_server, texts[1].encode(), "text/plain; charset=utf-8", "?top_k=1"
    )
    assert status == 200 and len(plain["predictions"]) == 1
    top = _expected(text_model, tokenizer, texts[1:2])[0]
    assert plain["predictions"][0]["index"] == int(top.argmax())
    status, many = _classify(text_server, json.dumps({"texts": texts}).encode(), "application/json")
    assert status == 200, many
    for text, result in zip(texts, many["results"], strict=True):
        alone = _expected(text_model, tokenizer, [text])[0]
        best = result["predictions"][0]
        assert best["index"] == int(alone.argmax())
        assert best["probability"] == pytest.approx(float(alone.max()), abs=1e-5)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"", "text/plain", "empty"),
        (b"   \n", "text/plain", "empty"),
        (b"\xff\xfe hello", "text/plain", "not UTF-8"),
        (b'{"text": ""}', "application/json", "empty"),
        (b'{"text": 3}', "application/json", "must be a string"),
        (b'{"texts": "one"}', "application/json", "non-empty list"),
        (b'{"texts": []}', "application/json", "non-empty list"),
        (b'{"texts": ["a", 2]}', "application/json", "texts[1] must be a string"),
        (b'{"words": "a"}', "application/json", '{"text"'),
        (b'{"text": "a", "texts": ["b"]}', "application/json", '{"text"'),
        (b"[1, 2]", "application/json", '{"text"'),
        (b"{not json", "application/json", "malformed JSON"),
        (b"\x01\x02", "text/plain", "yields no tokens"),
        (json.dumps({"texts": ["hi"] * (MAX_BATCH + 1)}).encode(), "application/json", "at most"),
    ],
)
def test_bad_text_is_400_and_the_server_stays_up(
    text_server: ServerProcess, body: bytes, content_type: str, message: str
) -> None:
    status, answer = _classify(text_server, body, content_type)
    assert status == 400 and message in answer["error"], answer
    assert _classify(text_server, b"free prize", "text/plain")[0] == 200


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"input_ids": np.ones((1, 5), np.int64), "attention_mask": np.ones((1, 4), np.int64)},
            "one length",
        ),
        (ids_and_mask(33), "outside the model's 1 to 32"),
        (
            {
                "input_ids": np.full((1, 3), 10_000, np.int64),
                "attention_mask": np.ones((1, 3), np.int64),
            },
            "vocabulary",
        ),
        (
            {
                "input_ids": np.full((1, 3), -1, np.int64),
                "attention_mask": np.ones((1, 3), np.int64),
            },
            "vocabulary",
        ),
    ],
    ids=["lengths-differ", "too-long", "id-too-large", "negative-id"],
)
def test_bad_ids_are_400(text_server: ServerProcess, inputs: dict, message: str) -> None:
    client = httpclient.InferenceServerClient(text_server.host_port)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("sms", tensors(inputs))
    assert caught.value.status() == "400" and message in caught.value.message()
    assert client.infer("sms", tensors(ids_and_mask(3))).as_numpy("logits").shape == (1, 3)


def test_classify_on_a_series_model_is_404(series_server: ServerProcess) -> None:
    status, answer = _classify(series_server, b'{"text": "hi"}', "application/json")
    assert status == 404
    assert "series sequence_classification" in answer["error"]
    assert "/v2/models/sensor/infer" in answer["error"]


def test_a_tokenizer_that_does_not_load_stops_start_up(tmp_path: Path, text_model: Path) -> None:
    import onnx

    from serving.cli import app
    from serving.contract import KEY_TOKENIZER

    model = onnx.load(str(text_model))
    for prop in model.metadata_props:
        if prop.key == KEY_TOKENIZER:
            prop.value = '{"not": "a tokenizer"}'
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["--engine", str(broken), "--port", "0"])
    assert result.exit_code == 2
    assert "carries a tokenizer that does not load" in result.output, result.output


def test_warm_up_runs_each_batch_size_at_the_shortest_and_longest_length(
    text_model: Path,
) -> None:
    from serving.backends import load_onnxruntime
    from serving.server import warm

    backend = load_onnxruntime(text_model, threads=1)
    seen: list[tuple] = []
    run = backend.run

    def recorded(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append((inputs["input_ids"].shape, inputs["attention_mask"].shape))
        return run(inputs)

    backend.run = recorded  # type: ignore[method-assign]
    warm(backend, [1, 4])
    shapes = [(1, 1), (1, 32), (4, 1), (4, 32)]
    assert seen == [(shape, shape) for shape in shapes]
