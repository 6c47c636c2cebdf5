"""schemathesis against the server's own OpenAPI document (GET /v2/openapi.json).

Schema-valid and schema-violating requests to every JSON route, on loopback, bounded in
count (MAX_EXAMPLES per route) and time (each answer within RESPONSE_S): no 5xx, every
answer well-formed, and the server alive and serving afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving.reliability_helpers import infer_json, post
from tests.serving.serving_helpers import ServerProcess, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_EXAMPLES = 60
# Every route the document lists; schemathesis leaves out the document's own URL.
ROUTES = [
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2",
    "GET /metrics",
    "GET /v2/models/{model_name}",
    "GET /v2/models/{model_name}/ready",
    "GET /v2/models/{model_name}/config",
    "GET /v2/models/{model_name}/stats",
    "GET /v2/models/stats",
    "GET /v2/models/{model_name}/versions/{model_version}",
    "POST /v2/models/{model_name}/infer",
    "POST /v2/models/{model_name}/versions/{model_version}/infer",
    "POST /v1/classify",
]
RESPONSE_S = 5.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
tried: Counter[str] = Counter()  # cases per status code, reported by the last test


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path) -> Iterator[ServerProcess]:
    args = ("--threads", "1", "--max-batch-size", "8", "--max-request-mb", "1")
    process = start_server(tiny_model, *args)
    yield process
    assert process.terminate() == 0, "\n".join(process.log)


@pytest.fixture(scope="module")
def operations(fuzz_server: ServerProcess) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/v2/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[operation.label] = operation
    return found


def test_the_document_lists_every_json_route(operations: dict[str, Any]) -> None:
    assert len(operations) == len(ROUTES) and set(operations) == set(ROUTES)


# schemathesis' own pytest integration (from_fixture) fails on pytest 9 (it sets the
# removed Function._nodeid), so each operation's case strategy is driven by hypothesis here.
@pytest.mark.parametrize(
    ("route", "mode"),
    [(r, GenerationMode.POSITIVE) for r in ROUTES]
    # Negative cases need something to break: a body or a path parameter with fixed values.
    + [(r, GenerationMode.NEGATIVE) for r in ROUTES if "{" in r or r.startswith("POST")],
)
def test_api_never_errors(
    operations: dict[str, Any], fuzz_server: ServerProcess, route: str, mode: GenerationMode
) -> None:
    operation = operations[route]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(mode))
    def fuzz(case) -> None:
        response = case.call(base_url=fuzz_server.url, timeout=RESPONSE_S)
        if _timed_out_as_asked(case, response):
            tried["504 within its own timeout"] += 1
            return
        tried[str(response.status_code)] += 1
        checks = CHECKS if mode is GenerationMode.POSITIVE else CHECKS[:1]
        case.validate_response(response, checks=checks)

    fuzz()


def _timed_out_as_asked(case: Any, response: Any) -> bool:
    """A 504 for a request whose own ``timeout`` parameter (µs, any >= 0 is schema-valid)
    ran out in the queue: the answer the protocol asks for, not a server error."""
    body = case.body if isinstance(case.body, dict) else {}
    parameters = body.get("parameters")
    asked = isinstance(parameters, dict) and type(parameters.get("timeout")) is int
    return (
        asked
        and response.status_code == 504
        and "request timeout expired" in response.json().get("error", "")
    )


def test_server_alive_and_serving_after_the_fuzz(fuzz_server: ServerProcess) -> None:
    assert fuzz_server.proc.poll() is None
    status, answer, _ = post(fuzz_server, infer_json(request_id="after-fuzz"))
    assert status == 200 and answer["id"] == "after-fuzz"
    assert sum(tried.values()) > 0 and not any(
        code.startswith("5") for code in tried if " " not in code
    )
    print(f"\nRELIABILITY fuzz: {sum(tried.values())} schemathesis cases, by status {dict(tried)}")
