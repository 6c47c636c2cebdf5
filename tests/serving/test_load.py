"""Queueing under load on a deliberately slow model: batching, overload, timeouts, drain.

The slow model spends about 0.3 s per backend run whatever the batch or its pixels (1
intra-op thread, our CI's Xeon VM). The tests wait for the server to hold the requests they
set up (``wait_until_holding``) and assert order and counts, not how long things took, so
they hold on a CPU of any speed.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.serving_helpers import (
    ServerProcess,
    build_model,
    start_server,
    wait_until_holding,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("slow") / "slow.onnx", slow_rounds=120)


@pytest.fixture(scope="module")
def slow_server(slow_model: Path) -> Iterator[ServerProcess]:
    args = (
        "--threads",
        "1",
        "--max-batch-size",
        "4",
        "--max-queue-size",
        "3",
        "--timeout-ms",
        "5000",
    )
    process = start_server(slow_model, *args, "--no-warmup")
    yield process
    assert process.terminate() == 0, "\n".join(process.log)


def infer_body(rows: int = 1, timeout_us: int | None = None) -> bytes:
    request: dict = {
        "inputs": [
            {
                "name": "images",
                "shape": [rows, 3, 8, 8],
                "datatype": "UINT8",
                "data": [7] * (rows * 192),
            }
        ]
    }
    if timeout_us is not None:
        request["parameters"] = {"timeout": timeout_us}
    return json.dumps(request).encode()


def post(
    server: ServerProcess, body: bytes, path: str = "/v2/models/tiny/infer"
) -> tuple[int, dict, float]:
    """One request on its own connection: (status, JSON body, seconds); reads one response."""
    start = time.perf_counter()
    connection = server.connection()
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read() or b"{}")
        return (
            response.status,
            {**payload, "_retry_after": response.headers.get("Retry-After")},
            time.perf_counter() - start,
        )
    finally:
        connection.close()


def in_threads(count: int, target) -> list:
    results: list = [None] * count

    def run(i: int) -> None:
        results[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def scrape(server: ServerProcess) -> dict[str, float]:
    connection = server.connection()
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def statistics(server: ServerProcess) -> dict:
    """The model's Triton ``model_stats`` entry."""
    connection = server.connection()
    connection.request("GET", "/v2/models/tiny/stats")
    return json.loads(connection.getresponse().read())["model_stats"][0]


def test_overload_rejects_with_503_and_batches_the_queue(slow_server: ServerProcess) -> None:
    before = scrape(slow_server)
    results: list = []
    first = threading.Thread(target=lambda: results.append(post(slow_server, infer_body())))
    first.start()
    wait_until_holding(slow_server, inflight=1, queued=0)  # 9 more arrive while it runs
    results += in_threads(9, lambda i: post(slow_server, infer_body()))
    first.join()
    statuses = [status for status, _, _ in results]
    assert len(results) == 10 and all(s in (200, 503) for s in statuses), statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 2
    rejected = [payload for status, payload, _ in results if status == 503]
    assert all(p["_retry_after"] == "1" and "maximum queue size" in p["error"] for p in rejected)
    after = scrape(slow_server)
    model = '{"model": "tiny"}'
    assert after["tensorferry_request_success_total" + model] - before.get(
        "tensorferry_request_success_total" + model, 0
    ) == statuses.count(200)
    rejected_key = 'tensorferry_request_failure_total{"model": "tiny", "reason": "rejected"}'
    assert after[rejected_key] - before.get(rejected_key, 0) == statuses.count(503)
    # The requests that queued behind the first one ran together.
    batches = after["tensorferry_batch_size_count" + model] - before.get(
        "tensorferry_batch_size_count" + model, 0
    )
    rows = after["tensorferry_batch_size_sum" + model] - before.get(
        "tensorferry_batch_size_sum" + model, 0
    )
    assert rows == statuses.count(200) and batches < rows


def test_queue_timeout_is_answered_while_queued(slow_server: ServerProcess) -> None:
    busy = threading.Thread(target=post, args=(slow_server, infer_body()))
    busy.start()
    wait_until_holding(slow_server, inflight=1, queued=0)  # the busy request is running
    before = statistics(slow_server)
    status, payload, _ = post(slow_server, infer_body(timeout_us=50_000))
    answered = statistics(slow_server)
    busy.join()
    assert status == 504 and "timeout" in payload["error"]
    assert answered["execution_count"] == before["execution_count"], (
        "the 504 waited for the running batch to end"
    )
    failed, failed_before = answered["inference_stats"]["fail"], before["inference_stats"]["fail"]
    assert failed["count"] - failed_before["count"] == 1
    # It waited for its 50 ms, not expired at once: about 50 ms here, a few less after a busy
    # event loop pass (the loop reads its clock once a pass); a unit slip would be 1000x off.
    assert failed["ns"] - failed_before["ns"] >= 0.005e9
    assert post(slow_server, infer_body())[0] == 200


def test_sigterm_drains_queued_requests_then_exits_0(slow_model: Path) -> None:
    server = start_server(slow_model, "--threads", "1", "--max-batch-size", "1", "--no-warmup")
    results = []
    workers = threading.Thread(
        target=lambda: results.extend(in_threads(3, lambda i: post(server, infer_body())))
    )
    workers.start()
    wait_until_holding(server, inflight=3, queued=2)  # one batch of 1 runs, two wait
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    ready = server.connection()
    ready.request("GET", "/v2/health/ready")
    assert ready.getresponse().status == 503
    late_status, late, _ = post(server, infer_body())
    assert late_status == 503 and "shutting down" in late["error"]
    workers.join(30)
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert server.proc.wait(15) == 0, "\n".join(server.log)
