"""deploy/grafana: every PromQL expression names series a real server exports."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from deploy_helpers import DEPLOY, ServerProcess, get, infer_json
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = json.loads((DEPLOY / "grafana" / "tensorferry-serving.json").read_text())
METRIC = re.compile(r"\btensorferry_[a-z_]+\b")
BY = re.compile(r"\bby \(([^)]*)\)")


def expressions() -> list[str]:
    exprs = [t["expr"] for panel in DASHBOARD["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    return exprs


@pytest.fixture(scope="module")
def scrape(entrypoint_server: ServerProcess) -> dict[str, set[str]]:
    """Sample name -> label names, after good and bad requests."""
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    for _ in range(3):
        infer_json(entrypoint_server.url, "tiny", images)
    bad = urllib.request.Request(
        entrypoint_server.url + "/v2/models/tiny/infer", data=b"{", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(bad, timeout=10)
    _, body = get(entrypoint_server.url + "/metrics")
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_dashboard_covers_the_issue_panels() -> None:
    text = " ".join(expressions())
    for needed in (
        "histogram_quantile(0.99, sum by (le) (rate(tensorferry_request_duration_seconds_bucket",
        "tensorferry_queue_duration_seconds_bucket",
        "tensorferry_compute_duration_seconds_bucket",
        'sum(rate(tensorferry_inference_count_total{model=~"$model"}[$__rate_interval])) / '
        "sum(rate(tensorferry_execution_count_total",
        "tensorferry_pending_requests",
        "sum by (reason) (rate(tensorferry_request_failure_total",
    ):
        assert needed in text, needed
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("expr", expressions())
def test_every_metric_and_label_is_exported(expr: str, scrape: dict[str, set[str]]) -> None:
    names = set(METRIC.findall(expr))
    assert names, f"no tensorferry metric in {expr}"
    missing = names - scrape.keys()
    assert not missing, f"{expr} uses {missing}, not exported"
    labels = set.union(*(scrape[n] for n in names))
    grouped = {label.strip() for group in BY.findall(expr) for label in group.split(",")}
    assert grouped <= labels | {"instance", "pod", "job"}, f"{expr}: {grouped - labels}"
    if "model=~" in expr or "tensorferry_model_info, model" in expr:
        assert "model" in labels


def test_requests_reached_the_counters(scrape: dict[str, Any], entrypoint_server) -> None:
    _, body = get(entrypoint_server.url + "/metrics")
    text = body.decode()
    assert re.search(r'tensorferry_request_success_total\{model="tiny"\} [1-9]', text)
    assert re.search(
        r'tensorferry_request_failure_total\{model="tiny",reason="bad_request"\} 1', text
    )
