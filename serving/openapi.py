"""``GET /v2/openapi.json``: an OpenAPI 3.0 description of the JSON routes, for this model.

A tabular model's routes (/v1/predict, /v1/classify) list its columns: a schema-valid
record is one the server takes. Records as lists in column order are taken too but not
described, since OpenAPI 3.0 cannot type an array's items by position.

The API fuzz test (schemathesis) reads it from the running server, so what is fuzzed is
what is served, and a request the document allows is one the server answers: every input
once, with an exact shape and as many values as that shape holds. It describes the JSON
form of infer; the binary tensor extension is a framing on top of it (see the protocol
reference) that OpenAPI cannot express.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving.contract import (
    NUMERIC,
    Signature,
    TabularColumn,
    TabularPreprocessing,
    TensorSpec,
)
from serving.protocol import DATATYPES

# Batch sizes the document offers, from 1: each is one more alternative shape per input.
_DOCUMENTED_BATCH = 2

_ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
_OBJECT = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
_INFER_OK = {
    "description": "OK: JSON, or once an output is asked for as binary data, the binary "
    "tensor extension (a JSON header of Inference-Header-Content-Length bytes, then the "
    "tensors' bytes)",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _path(name: str, value: str) -> dict[str, Any]:
    # One model, one version per server: say so, so clients (and fuzzers) reach the routes.
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": [value]},
    }


def _flags(*names: str) -> dict[str, Any]:
    """An OK answer whose JSON object carries ``names`` (``ready`` and ``live`` are booleans)."""
    fields = {n: {"type": "string" if n == "name" else "boolean"} for n in names}
    schema = {"type": "object", "required": list(names), "properties": fields}
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _get(ok: dict[str, Any], summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": list(params), "responses": _answers(ok)}}


def _answers(ok: dict[str, Any]) -> dict[str, Any]:
    return {"200": ok, "default": _ERROR}


def _element(spec: TensorSpec) -> dict[str, Any]:
    dtype = DATATYPES[spec.datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
    if dtype.kind == "f":  # finite in the dtype, so no value overflows to inf on the way in
        largest = float(np.finfo(dtype).max)
        return {"type": "number", "minimum": -largest, "maximum": largest}
    return {"type": "boolean"} if dtype.kind == "b" else {"type": "string"}


def _zero(spec: TensorSpec) -> Any:
    kind = DATATYPES[spec.datatype].kind
    return {"b": False, "O": "", "f": 0.0}.get(kind, 0)


def _shapes(signature: Signature, batch: int) -> list[list[int]]:
    """Every input's exact shape for ``batch`` rows; a dynamic non-batch dim is 1."""
    shapes = []
    for spec in signature.inputs:
        dims = [1 if d == -1 else d for d in spec.shape]
        shapes.append([batch, *dims[1:]] if signature.batching else dims)
    return shapes


def _tensor(spec: TensorSpec, shape: list[int]) -> dict[str, Any]:
    count = math.prod(shape)
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "enum": [spec.name]},
            "shape": {"type": "array", "items": {"type": "integer"}, "enum": [shape]},
            "datatype": {"type": "string", "enum": [spec.datatype]},
            "data": {
                "type": "array",
                "items": _element(spec),
                "minItems": count,
                "maxItems": count,
            },
        },
    }


def _each_once(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """An array holding one item for each of ``schemas`` (distinct by name), in any order."""
    if len(schemas) <= 1:
        items = schemas[0] if schemas else {}
        return {"type": "array", "items": items, "minItems": len(schemas), "maxItems": len(schemas)}
    return {
        "type": "array",
        "items": {"oneOf": schemas},
        "minItems": len(schemas),
        "maxItems": len(schemas),
        # OpenAPI 3.0's JSON Schema has no `contains`: "not every item fails to match".
        "allOf": [{"not": {"items": {"not": schema}}} for schema in schemas],
    }


def _inputs(signature: Signature, max_batch: int) -> dict[str, Any]:
    """Every input once, with one exact shape per batch size, so the inputs agree on it
    and ``data`` fits it: a schema-valid request is one the server answers."""
    batches = range(1, min(max_batch, _DOCUMENTED_BATCH) + 1) if signature.batching else [1]
    options = [
        _each_once(
            [
                _tensor(spec, shape)
                for spec, shape in zip(signature.inputs, _shapes(signature, b), strict=True)
            ]
        )
        for b in batches
    ]
    return options[0] if len(options) == 1 else {"oneOf": options}


def _outputs(signature: Signature) -> dict[str, Any]:
    """Every output once (or none of them: the property is optional, and means all), each
    JSON or binary, a numeric one also as top-k classes (the classification extension)."""
    entries = []
    for spec in signature.outputs:
        parameters: dict[str, Any] = {"binary_data": {"type": "boolean"}}
        if spec.datatype not in ("BOOL", "BYTES"):
            parameters["classification"] = {"type": "integer", "minimum": 1}
        properties = {
            "name": {"type": "string", "enum": [spec.name]},
            "parameters": {"type": "object", "properties": parameters},
        }
        entries.append({"type": "object", "required": ["name"], "properties": properties})
    return _each_once(entries)


def _infer_request(signature: Signature, max_batch: int) -> dict[str, Any]:
    parameters = {
        "timeout": {"type": "integer", "minimum": 0},
        "binary_data_output": {"type": "boolean"},
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": parameters},
            "inputs": _inputs(signature, max_batch),
            "outputs": _outputs(signature),
        },
    }


def _infer(signature: Signature, max_batch: int, *params: dict[str, Any]) -> dict[str, Any]:
    shapes = _shapes(signature, 1)
    inputs = [
        {
            "name": spec.name,
            "shape": shape,
            "datatype": spec.datatype,
            "data": [_zero(spec)] * math.prod(shape),
        }
        for spec, shape in zip(signature.inputs, shapes, strict=True)
    ]
    example = {"id": "example", "inputs": inputs}
    body = {"schema": _infer_request(signature, max_batch), "example": example}
    return {
        "post": {
            "summary": "Run the model on one request (JSON tensors)",
            "parameters": list(params),
            "requestBody": {"required": True, "content": {"application/json": body}},
            "responses": _answers(_INFER_OK),
        }
    }


def _column(column: TabularColumn, impute: bool) -> dict[str, Any]:
    """A record's value for ``column``; null too when the model imputes missing values."""
    nullable = {"nullable": True} if impute else {}
    if column.type == NUMERIC:  # finite in float32, as infer's FP32 inputs
        largest = float(np.finfo(np.float32).max)
        return {"type": "number", "minimum": -largest, "maximum": largest, **nullable}
    known = [{"type": "string", "enum": list(column.categories)}] if column.categories else []
    return {
        "description": "a category the model knows, or any other string (an unseen category)",
        "anyOf": [*known, {"type": "string", **nullable}],
    }


def _example(column: TabularColumn) -> Any:
    if column.type == NUMERIC:
        return 0.0
    return column.categories[0] if column.categories else ""


def _records(tabular: TabularPreprocessing, max_rows: int) -> dict[str, Any]:
    """The body of /v1/predict and a tabular /v1/classify: one record, or a list."""
    record: dict[str, Any] = {
        "type": "object",
        "properties": {c.name: _column(c, tabular.impute) for c in tabular.columns},
        "additionalProperties": False,
    }
    if not tabular.impute:  # with impute, a missing column is a missing value
        record["required"] = [c.name for c in tabular.columns]
    instances = {"type": "array", "items": record, "minItems": 1, "maxItems": max_rows}
    schema = {
        "oneOf": [
            {
                "type": "object",
                "required": [key],
                "properties": {key: value},
                "additionalProperties": False,
            }
            for key, value in (("instance", record), ("instances", instances))
        ]
    }
    example = {"instances": [{c.name: _example(c) for c in tabular.columns}]}
    return {"application/json": {"schema": schema, "example": example}}


_CLASS = {
    "type": "object",
    "required": ["index", "class", "probability"],
    "properties": {
        "index": {"type": "integer"},
        "class": {"type": "string"},
        "probability": {"type": "number", "nullable": True},
    },
}


def _predict(tabular: TabularPreprocessing, max_rows: int, regression: bool) -> dict[str, Any]:
    value = {"type": "number", "nullable": True}  # null: a value the model could not compute
    answer = {
        "type": "object",
        "required": ["model_name", "predictions"],
        "properties": {
            "model_name": {"type": "string"},
            "predictions": {"type": "array", "items": value if regression else _CLASS},
        },
    }
    ok = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    what = "a value" if regression else "the top class"
    return {
        "post": {
            "summary": f"Predict from records of named columns: {what} per record",
            "requestBody": {"required": True, "content": _records(tabular, max_rows)},
            "responses": _answers(ok),
        }
    }


def _classify(
    kind: str, max_texts: int, records: TabularPreprocessing | None = None
) -> dict[str, Any]:
    top_k = {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    if kind == "tabular" and records is not None:
        summary = "Classify records of named columns: one, or a list of up to the max batch size"
        content = _records(records, max_texts)
    elif kind == "text":
        summary = "Classify raw text: one text, or a list of up to the max batch size"
        text = {"type": "string", "minLength": 1}
        one = {"type": "object", "required": ["text"], "properties": {"text": text}}
        texts = {"type": "array", "items": text, "minItems": 1, "maxItems": max_texts}
        many = {"type": "object", "required": ["texts"], "properties": {"texts": texts}}
        content = {
            "application/json": {"schema": {"oneOf": [one, many]}},
            "text/plain": {"schema": text},  # UTF-8
        }
    else:
        summary = "Classify one PNG or JPEG image"
        content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "post": {
            "summary": summary,
            "parameters": [top_k],
            "requestBody": {"required": True, "content": content},
            "responses": _answers(_OBJECT),
        }
    }


def document(
    model: str,
    version: str,
    signature: Signature,
    max_batch: int,
    classify: str | None = "image",
    max_texts: int = 1,
    records: TabularPreprocessing | None = None,
    regression: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document for a server of ``model`` with ``signature``; ``classify``:
    what /v1/classify takes ("image", "text", "tabular" ``records``, or None: no such
    route); ``max_texts``: the most texts or records one request may carry; ``records``: a
    tabular model's columns, for /v1/predict (a regressor's answers are values)."""
    base, versioned = "/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"
    name, version_param = _path("model_name", model), _path("model_version", "1")
    text = {"description": "Prometheus text", "content": {"text/plain": {"schema": {}}}}
    paths = {
        "/v2/health/live": _get(_flags("live"), "Liveness"),
        "/v2/health/ready": _get(_flags("ready"), "Readiness"),
        "/v2": _get(_OBJECT, "Server metadata"),
        "/v2/openapi.json": _get(_OBJECT, "This document"),
        "/metrics": _get(text, "Prometheus metrics"),
        base: _get(_OBJECT, "Model metadata", name),
        base + "/ready": _get(_flags("name", "ready"), "Model readiness", name),
        base + "/config": _get(_OBJECT, "Triton-style model config", name),
        base + "/stats": _get(_OBJECT, "Triton statistics extension", name),
        "/v2/models/stats": _get(_OBJECT, "Triton statistics extension, every model"),
        versioned: _get(_OBJECT, "Model metadata", name, version_param),
        base + "/infer": _infer(signature, max_batch, name),
        versioned + "/infer": _infer(signature, max_batch, name, version_param),
    }
    if classify:
        paths["/v1/classify"] = _classify(classify, max_texts, records)
    if records is not None:
        paths["/v1/predict"] = _predict(records, max_texts, regression)
    return {
        "openapi": "3.0.3",
        "info": {"title": f"tensorferry serving {model}", "version": version},
        "paths": paths,
    }
