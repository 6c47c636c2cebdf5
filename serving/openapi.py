"""``GET /v2/openapi.json``: an OpenAPI 3.0 description of the JSON routes, for this model.

The API fuzz test (schemathesis) reads it from the running server, so what is fuzzed is
what is served. It describes the JSON form of infer; the binary tensor extension is a
framing on top of it (see the protocol reference) that OpenAPI cannot express.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving.protocol import DATATYPES, TensorSpec

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
    return {"type": "boolean"} if dtype.kind == "b" else {"type": "number"}


def _infer_request(spec: TensorSpec, max_batch: int) -> dict[str, Any]:
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "enum": [spec.name]},
            "shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": max_batch},
                "minItems": len(spec.shape),
                "maxItems": len(spec.shape),
            },
            "datatype": {"type": "string", "enum": [spec.datatype]},
            "data": {"type": "array", "items": _element(spec)},
        },
    }
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        },
    }
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
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": output},
        },
    }


def _infer(spec: TensorSpec, max_batch: int, *params: dict[str, Any]) -> dict[str, Any]:
    one = [1, *spec.shape[1:]]
    example = {
        "id": "example",
        "inputs": [
            {
                "name": spec.name,
                "shape": one,
                "datatype": spec.datatype,
                "data": [0] * math.prod(one),
            }
        ],
    }
    body = {"schema": _infer_request(spec, max_batch), "example": example}
    return {
        "post": {
            "summary": "Run the model on one request (JSON tensors)",
            "parameters": list(params),
            "requestBody": {"required": True, "content": {"application/json": body}},
            "responses": _answers(_OBJECT),
        }
    }


def _classify() -> dict[str, Any]:
    top_k = {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    image = {"schema": {"type": "string", "format": "binary"}}
    return {
        "post": {
            "summary": "Classify one PNG or JPEG image",
            "parameters": [top_k],
            "requestBody": {"required": True, "content": {"application/octet-stream": image}},
            "responses": _answers(_OBJECT),
        }
    }


def document(model: str, version: str, spec: TensorSpec, max_batch: int) -> dict[str, Any]:
    """The OpenAPI document for a server of ``model`` whose input is ``spec``."""
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
        base + "/infer": _infer(spec, max_batch, name),
        versioned + "/infer": _infer(spec, max_batch, name, version_param),
        "/v1/classify": _classify(),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": f"tensorferry serving {model}", "version": version},
        "paths": paths,
    }
