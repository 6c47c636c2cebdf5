"""serving.tabular below the server: request bodies, records to features (column order,
list form, unseen categories, missing values, unknown keys, types), answers, and the
OpenAPI description of the records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving import openapi
from serving.contract import (
    REGRESSION,
    TABULAR_CLASSIFICATION,
    Signature,
    TensorSpec,
)
from serving.protocol import ProtocolError
from serving.tabular import TabularEncoder, encoder, predictions, records, values
from tests.serving.tabular_models import COLUMNS, contract

FEATURES = TensorSpec("features", "FP32", (-1, len(COLUMNS)))
SIGNATURE = Signature.from_graph((FEATURES,), (TensorSpec("prediction", "FP32", (-1,)),))


def _encoder(impute: bool) -> TabularEncoder:
    found = encoder(contract(REGRESSION, impute, "m"), SIGNATURE)
    assert found is not None
    return found


def _body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_records_take_one_instance_or_a_list() -> None:
    assert records(_body({"instance": {"age": 1}}), 4) == ([{"age": 1}], False)
    assert records(_body({"instances": [[1], {"a": 2}]}), 4) == ([[1], {"a": 2}], True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "malformed JSON"),
        (b"\xff", "malformed JSON"),
        (b"[1]", '{"instances": ['),
        (b'{"rows": []}', '{"instances": ['),
        (b'{"instance": {}, "instances": []}', '{"instances": ['),
        (b'{"instances": []}', "non-empty list"),
        (b'{"instances": {"age": 1}}', "non-empty list"),
        (_body({"instances": [{}] * 5}), "'instances' has 5 records; this server takes at most 4"),
        (b'{"instance": {"age": NaN}}', "JSON has no NaN: send null"),
        (b'{"instance": {"age": -Infinity}}', "JSON has no -Infinity"),
    ],
)
def test_bad_bodies_say_what_to_send(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("{", r"\{")):
        records(body, 4)


def test_named_columns_take_the_contract_order_and_categories_map_to_codes() -> None:
    rows = _encoder(impute=False).encode(
        [
            {"rooms": "3", "income": 2500.5, "city": "rome", "age": 31},
            [45, "berlin", 1000, 4],  # list form; a number for a categorical is str()'d
            {"age": 20, "city": "london", "income": -3, "rooms": 2.0},  # unseen: -1
        ],
        many=True,
    )
    assert rows.dtype == np.float32 and rows.shape == (3, 4)
    np.testing.assert_array_equal(
        rows,
        [[31, 2, 2500.5, 2], [45, 0, 1000, 3], [20, -1, -3, -1]],  # "2.0" is not "2"
    )


def test_missing_values_are_nan_with_impute() -> None:
    rows = _encoder(impute=True).encode(
        [{"age": None, "city": "paris"}, [None, None, 1.0, "1"]], many=True
    )
    assert np.isnan(rows[0, [0, 2, 3]]).all() and rows[0, 1] == 1
    assert np.isnan(rows[1, :2]).all() and list(rows[1, 2:]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"age": 1, "city": "rome", "income": 2}, "instances[0] lacks a value for column 'rooms'"),
        ([1, None, 2, "1"], "instances[0] lacks a value for column 'city' (missing or null)"),
        ({"age": 1, "town": "x", "zip": 1}, "unknown columns 'town', 'zip'; the model's columns"),
        ({"Age": 1}, "unknown column 'Age'; the model's columns are age, city, income, rooms"),
        ([1, "rome", 2], "has 3 values; the model takes 4, in this order: age, city"),
        ([1, "rome", 2, "1", 5], "has 5 values"),
        ("age=1", "must be an object keyed by column name or a list of 4 values"),
        (3, "not a number"),
        ({"age": True}, "column 'age' must be a number, not a boolean"),
        ({"age": "31"}, "column 'age' must be a number, not a string"),
        ({"age": [1]}, "column 'age' must be a number, not an array"),
        ({"age": 1e39}, "beyond float32's range"),
        ({"age": 10**400}, "beyond float32's range"),
        ({"age": 1, "city": False}, "column 'city' is categorical: send its value as a string"),
        ({"age": 1, "city": {"name": "rome"}}, "not an object"),
    ],
)
def test_a_bad_record_names_the_record_and_the_column(record: object, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        _encoder(impute=False).encode([record], many=True)
    assert message in str(caught.value), caught.value


def test_a_single_instance_is_named_as_such() -> None:
    with pytest.raises(ProtocolError, match="the instance has unknown column 'x'"):
        _encoder(impute=True).encode([{"x": 1}], many=False)


def test_only_a_tabular_model_whose_one_input_is_its_features_gets_an_encoder() -> None:
    assert encoder(None, SIGNATURE) is None
    assert encoder(contract(REGRESSION, False, "m"), SIGNATURE) is not None
    two = Signature.from_graph((FEATURES, TensorSpec("extra", "FP32", (-1, 1))), SIGNATURE.outputs)
    assert encoder(contract(REGRESSION, False, "m"), two) is None


def test_answers_are_values_or_the_top_class_per_row() -> None:
    prediction = np.array([1.5, np.nan, np.inf, -2.0], np.float32)
    assert values({"prediction": prediction}) == [1.5, None, None, -2.0]
    assert values({"prediction": np.array([[1.0, 2.0]], np.float32)}) == [[1.0, 2.0]]
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    classifier = contract(TABULAR_CLASSIFICATION, False, "m")
    top = predictions({"probabilities": probabilities}, classifier)
    assert [(p["class"], p["index"]) for p in top] == [("mid", 1), ("low", 0)]
    assert top[0]["probability"] == pytest.approx(0.7)
    assert predictions({"prediction": prediction[:1]}, contract(REGRESSION, False, "m")) == [1.5]


def test_the_openapi_document_lists_the_columns() -> None:
    tabular = contract(REGRESSION, True, "m").tabular
    doc = openapi.document("m", "1", SIGNATURE, 8, None, 8, tabular, regression=True)
    assert "/v1/classify" not in doc["paths"]
    content = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    one, many = content["schema"]["oneOf"]
    record = one["properties"]["instance"]
    assert list(record["properties"]) == [c.name for c in COLUMNS]
    assert "required" not in record  # impute: any column may be missing
    assert record["properties"]["age"]["nullable"] is True
    assert record["properties"]["city"]["anyOf"][0]["enum"] == ["berlin", "paris", "rome"]
    assert many["properties"]["instances"]["maxItems"] == 8
    assert content["example"]["instances"][0] == {
        "age": 0.0,
        "city": "berlin",
        "income": 0.0,
        "rooms": "1",
    }
    classifier = contract(TABULAR_CLASSIFICATION, False, "c").tabular
    doc = openapi.document("c", "1", SIGNATURE, 8, "tabular", 8, classifier)
    assert {"/v1/predict", "/v1/classify"} <= doc["paths"].keys()
    schema = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]
    assert schema["schema"]["oneOf"][0]["properties"]["instance"]["required"] == [
        c.name for c in COLUMNS
    ]
