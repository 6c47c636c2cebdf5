"""Tabular models through the real server: records on /v1/predict and /v1/classify, and a
regressor's ``prediction`` over /v2 with tritonclient and KServe's client, each answer
checked against onnxruntime called directly on features built by hand."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from serving.contract import REGRESSION, TABULAR_CLASSIFICATION
from tests.serving import tabular_models
from tests.serving.serving_helpers import REPO, ServerProcess, fetch, start_server

pytestmark = pytest.mark.timeout(120)

MAX_BATCH = 8
NAN = float("nan")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tabular")
    return {
        # the regressor imputes missing values; the classifier refuses them
        "house": tabular_models.build(directory / "house.onnx", REGRESSION, True, "house"),
        "churn": tabular_models.build(
            directory / "churn.onnx", TABULAR_CLASSIFICATION, False, "churn"
        ),
    }


def _start(model: Path) -> ServerProcess:
    # A long queue delay: requests that queue behind a batch wait for company, so the
    # pipelined ones below merge on a CPU of any speed.
    args = ("--threads", "1", "--max-batch-size", str(MAX_BATCH), "--max-queue-delay-us", "20000")
    return start_server(model, *args)


@pytest.fixture(scope="module")
def house(models: dict[str, Path]) -> Iterator[ServerProcess]:
    server = _start(models["house"])
    yield server
    assert server.terminate() == 0, "\n".join(server.log)


@pytest.fixture(scope="module")
def churn(models: dict[str, Path]) -> Iterator[ServerProcess]:
    server = _start(models["churn"])
    yield server
    assert server.terminate() == 0, "\n".join(server.log)


def direct(model: Path, features: list[list[float]]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"features": np.array(features, np.float32)})
    return dict(zip(names, values, strict=True))


def post(server: ServerProcess, path: str, payload: Any) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, answer = fetch(server, path, body, {"Content-Type": "application/json"})
    return status, json.loads(answer)


# Records and the features they stand for: columns age, city, income, rooms.
HOUSE_RECORDS = [
    {"age": 31, "city": "rome", "income": 2500.5, "rooms": "3"},
    [45, "berlin", 1000, 4],  # list form, a number for a categorical
    {"income": 4100, "city": "london", "age": 52.5, "rooms": "9"},  # unseen categories
    {"age": None, "city": "paris"},  # null and missing: imputed
]
HOUSE_FEATURES = [[31, 2, 2500.5, 2], [45, 0, 1000, 3], [52.5, -1, 4100, -1], [NAN, 1, NAN, NAN]]


def test_predict_a_regressor_equals_onnxruntime(house: ServerProcess, models: dict) -> None:
    status, answer = post(house, "/v1/predict", {"instances": HOUSE_RECORDS})
    assert status == 200, answer
    assert answer["model_name"] == "house"
    want = direct(models["house"], HOUSE_FEATURES)["prediction"]
    assert np.array(answer["predictions"], np.float32).tolist() == want.tolist()
    # The numpy model agrees: unseen categories are all-zero one-hots, NaN is filled.
    features = np.array(HOUSE_FEATURES, np.float32)
    np.testing.assert_allclose(
        answer["predictions"], tabular_models.expected(REGRESSION, True, features), rtol=1e-5
    )
    status, one = post(house, "/v1/predict", {"instance": HOUSE_RECORDS[0]})
    assert status == 200 and one["predictions"] == answer["predictions"][:1]


CHURN_RECORDS = [
    {"age": 31, "city": "rome", "income": 2500.5, "rooms": "3"},
    {"age": 70, "city": "paris", "income": 800, "rooms": "1"},
    [22, "oslo", 6000, "4"],
]
CHURN_FEATURES = [[31, 2, 2500.5, 2], [70, 1, 800, 0], [22, -1, 6000, 3]]


def test_predict_a_classifier_answers_its_top_class(churn: ServerProcess, models: dict) -> None:
    status, answer = post(churn, "/v1/predict", {"instances": CHURN_RECORDS})
    assert status == 200, answer
    probabilities = direct(models["churn"], CHURN_FEATURES)["probabilities"]
    for row, got in zip(probabilities, answer["predictions"], strict=True):
        best = int(row.argmax())
        assert got == {
            "index": best,
            "class": tabular_models.CLASSES[best],
            "probability": pytest.approx(float(row[best]), abs=1e-6),
        }


def test_classify_a_tabular_classifier_answers_top_k(churn: ServerProcess, models: dict) -> None:
    probabilities = direct(models["churn"], CHURN_FEATURES)["probabilities"]
    status, one = post(churn, "/v1/classify", {"instance": CHURN_RECORDS[1]})
    assert status == 200, one
    assert [p["index"] for p in one["predictions"]] == list(np.argsort(-probabilities[1]))
    status, many = post(churn, "/v1/classify?top_k=2", {"instances": CHURN_RECORDS})
    assert status == 200 and len(many["results"]) == 3, many
    for row, result in zip(probabilities, many["results"], strict=True):
        ranked = result["predictions"]
        assert [p["class"] for p in ranked] == [
            tabular_models.CLASSES[i] for i in np.argsort(-row)[:2]
        ]
        assert ranked[0]["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_classify_a_regressor_is_404_naming_the_routes_that_fit(house: ServerProcess) -> None:
    status, answer = post(house, "/v1/classify", {"instance": HOUSE_RECORDS[0]})
    assert status == 404
    message = answer["error"]
    assert "'house' is a regression model, which returns values, not classes" in message
    assert "POST /v1/predict" in message and "POST /v2/models/house/infer" in message


def test_predict_on_an_image_model_is_404(server: ServerProcess) -> None:
    status, answer = post(server, "/v1/predict", {"instance": {"age": 1}})
    assert status == 404
    assert "/v1/predict serves tabular models" in answer["error"]
    assert "'tiny' is a image_classification model" in answer["error"]
    assert "POST /v1/classify or POST /v2/models/tiny/infer" in answer["error"]
    document = json.loads(fetch(server, "/v2/openapi.json")[2])
    assert "/v1/predict" not in document["paths"]


GOOD = {"instance": {"age": 31, "city": "rome", "income": 2500.5, "rooms": "3"}}


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        ("/v1/predict", {"instance": {"age": 1, "city": "rome", "income": 2}}, "column 'rooms'"),
        ("/v1/predict", {"instance": {**GOOD["instance"], "zip": 1}}, "unknown column 'zip'"),
        ("/v1/predict", {"instance": [1, "rome", 2]}, "has 3 values; the model takes 4"),
        ("/v1/predict", {"instances": [GOOD["instance"], {"age": True}]}, "instances[1]"),
        ("/v1/predict", {"instance": {**GOOD["instance"], "age": "x"}}, "must be a number"),
        ("/v1/predict", {"instances": [GOOD["instance"]] * (MAX_BATCH + 1)}, "at most 8"),
        ("/v1/predict", b'{"instance": {"age": NaN}}', "JSON has no NaN"),
        ("/v1/predict", b"{oops", "malformed JSON"),
        ("/v1/predict", {"records": []}, '{"instances": ['),
        ("/v1/classify?top_k=0", GOOD, "top_k must be a positive integer"),
    ],
)
def test_bad_requests_are_400_and_the_server_stays_up(
    churn: ServerProcess, path: str, payload: Any, message: str
) -> None:
    status, answer = post(churn, path, payload)
    assert status == 400 and message in answer["error"], answer
    status, answer = post(churn, "/v1/predict", GOOD)
    assert status == 200 and len(answer["predictions"]) == 1


def _pipelined(server: ServerProcess, bodies: list[bytes]) -> list[dict]:
    """Every request in one write on one connection, so they queue together and batching
    is decided by the scheduler alone; the answers, in order."""
    wire = b"".join(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body in bodies
    )
    answers, data = [], b""
    with socket.create_connection(server.host_port.split(":"), timeout=30) as sock:
        sock.sendall(wire)
        while len(answers) < len(bodies):
            head, sep, rest = data.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n") if sep else []
            size = next((int(h[15:]) for h in lines if h.startswith(b"content-length:")), -1)
            if not sep or len(rest) < size:
                data += sock.recv(1 << 16)
                continue
            assert head.startswith(b"HTTP/1.1 200"), head + rest[:size]
            answers.append(json.loads(rest[:size]))
            data = rest[size:]
    return answers


def _runs(server: ServerProcess) -> tuple[float, float]:
    """(rows, backend runs) so far, from /metrics."""
    body = fetch(server, "/metrics")[2].decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{.*\}} (\S+)$", body, re.M))

    return total("tensorferry_inference_count_total"), total("tensorferry_execution_count_total")


def test_records_share_batches_with_each_other(house: ServerProcess, models: dict) -> None:
    cities = ("london", "berlin", "paris", "rome")  # london is unseen: code -1
    records = [
        {"age": 20 + 5 * i, "city": cities[i % 4], "income": 3000 + i, "rooms": "2"}
        for i in range(12)
    ]
    features = [[20 + 5 * i, i % 4 - 1, 3000 + i, 1] for i in range(12)]
    bodies = [json.dumps({"instances": records[i : i + 2]}).encode() for i in range(0, 12, 2)]
    rows_before, runs_before = _runs(house)
    answers = _pipelined(house, bodies)
    rows, runs = _runs(house)
    # 12 rows in 6 requests, 8-row batches: 2 runs (3 if the first read ends early).
    assert rows - rows_before == 12 and runs - runs_before <= 3, runs - runs_before
    want = direct(models["house"], features)["prediction"].tolist()
    got = [value for answer in answers for value in answer["predictions"]]
    assert np.array(got, np.float32).tolist() == want


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_a_regressor_through_tritonclient(
    house: ServerProcess, models: dict, binary: bool
) -> None:
    features = np.array(HOUSE_FEATURES, np.float32)
    tensor = httpclient.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("prediction", binary_data=binary)]
    client = httpclient.InferenceServerClient(house.host_port)
    result = client.infer("house", [tensor], outputs=wanted)
    got = result.as_numpy("prediction")
    want = direct(models["house"], HOUSE_FEATURES)["prediction"]
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, want)
    metadata = client.get_model_metadata("house")
    assert metadata["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1]}]


def test_infer_a_regressor_through_kserve(house: ServerProcess, models: dict) -> None:
    # Importing kserve parses sys.argv for its own flags (see test_kserve_client.py).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    finally:
        sys.argv = argv
    features = np.array(HOUSE_FEATURES, np.float32)

    async def main() -> np.ndarray:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
            tensor = InferInput("features", list(features.shape), "FP32")
            tensor.set_data_from_numpy(features, binary_data=True)
            request = InferRequest("house", [tensor], parameters={"binary_data_output": True})
            response = await client.infer(house.url, request, model_name="house")
            return response.outputs[0].as_numpy()

    got = asyncio.run(main())
    np.testing.assert_array_equal(got, direct(models["house"], HOUSE_FEATURES)["prediction"])


def test_config_and_openapi_list_the_columns(churn: ServerProcess) -> None:
    config = json.loads(fetch(churn, "/v2/models/churn/config")[2])
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}]
    preprocessing = json.loads(config["parameters"]["tensorferry.preprocessing"]["string_value"])
    assert [c["name"] for c in preprocessing["tabular"]["columns"]] == [
        c.name for c in tabular_models.COLUMNS
    ]
    assert preprocessing["tabular"]["missing"] == "refuse"
    document = json.loads(fetch(churn, "/v2/openapi.json")[2])
    assert {"/v1/predict", "/v1/classify"} <= document["paths"].keys()


FUZZED = [
    ("house", "POST /v1/predict"),
    ("churn", "POST /v1/predict"),
    ("churn", "POST /v1/classify"),
]


@pytest.mark.parametrize("positive", [True, False], ids=["valid", "invalid"])
@pytest.mark.parametrize(("model", "route"), FUZZED)
def test_schemathesis_records_the_document_allows_are_answered(
    request: pytest.FixtureRequest, model: str, route: str, positive: bool
) -> None:
    """Schema-valid bodies (the document is exact) get 200 and a conforming answer;
    schema-violating ones no 5xx; the server serves on."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    server: ServerProcess = request.getfixturevalue(model)
    schema = schemathesis.openapi.from_url(server.url + "/v2/openapi.json")
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == route)
    mode = GenerationMode.POSITIVE if positive else GenerationMode.NEGATIVE

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(mode))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=server.url, timeout=5)
        if positive:
            assert response.status_code == 200, (case.body, response.text)
            case.validate_response(response)
        else:  # a violated query (an unknown parameter) may still be answered 200
            assert response.status_code < 500, (case.body, response.text)

    fuzz()
    assert post(server, "/v1/predict", GOOD)[0] == 200


def _readme_examples() -> list[tuple[str, bytes, dict]]:
    """(path, body, answer) of each curl example in serving/README.md's tabular section."""
    readme = (REPO / "serving" / "README.md").read_text()
    section = readme.split("## Tabular models and regression")[1].split("\n## ")[0]
    examples = []
    for block in re.findall(r"```\n(curl .*?)\n```", section, re.S):
        command, answer = block.rsplit("\n", 1)
        body = re.search(r"-d '(.*?)'", command, re.S)
        path = re.search(r"localhost:8000(/v1/[\w?=]+)", command)
        assert body and path, block
        examples.append((path.group(1), body.group(1).encode(), json.loads(answer)))
    return examples


def test_the_readme_examples_are_what_the_server_answers(
    house: ServerProcess, churn: ServerProcess
) -> None:
    examples = _readme_examples()
    assert len(examples) == 2
    for path, body, answer in examples:
        server = house if answer["model_name"] == "house" else churn
        status, got = post(server, path, body)
        assert status == 200 and got.keys() == answer.keys(), got
        have, want = got["predictions"], answer["predictions"]
        if isinstance(want[0], dict):  # the same classes, in order; then their probabilities
            assert [p["class"] for p in have] == [p["class"] for p in want]
            have, want = [p["probability"] for p in have], [p["probability"] for p in want]
        np.testing.assert_allclose(have, want, rtol=1e-5)  # another CPU may round last bits
