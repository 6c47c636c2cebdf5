"""deploy/k8s: schema-valid, and in agreement with the server's real flags and routes.

Built-in kinds are validated strictly (unknown fields rejected) with kubernetes-validate's
bundled Kubernetes JSON schemas; KServe's InferenceService with a vendored subset of its
CRD whose pod and container parts refer to those same Kubernetes schemas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from deploy_helpers import DEPLOY, DOCKERFILES, ServerProcess, env_of, get, parse_dockerfile
from deploy_helpers import stages as docker_stages
from prometheus_client.parser import text_string_to_metric_families

from serving.cli import app

WHY = "kubernetes-validate is not installed (pip install kubernetes-validate)"
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=WHY)
jsonschema = pytest.importorskip("jsonschema", reason=WHY)  # both come with kubernetes-validate
referencing = pytest.importorskip("referencing", reason=WHY)

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
KSERVE_SCHEMA = Path(__file__).with_name("schemas") / "kserve-inferenceservice-v1beta1.json"
VERSIONS = ("1.30.0", "1.37.0")  # oldest we support (preStop sleep), newest bundled
ENTRYPOINT_ENV = {"TENSORFERRY_ENGINE_CACHE"}  # read by deploy/docker/entrypoint.py
KSERVE_ENV = {"STORAGE_URI"}  # read by KServe's storage initializer

COMMAND = typer.main.get_command(app)
FLAGS = {opt for p in COMMAND.params for opt in (*p.opts, *p.secondary_opts)}
ENVVARS = {p.envvar for p in COMMAND.params if p.envvar}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


DOCS = documents()
IDS = [name for name, _ in DOCS]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def pod_specs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, pod annotations) of every Deployment and the InferenceService predictor."""
    specs = [
        (d["spec"]["template"]["spec"], d["spec"]["template"]["metadata"].get("annotations", {}))
        for d in by_kind("Deployment")
    ]
    specs += [
        (i["spec"]["predictor"], i["metadata"]["annotations"]) for i in by_kind("InferenceService")
    ]
    return specs


def validate_kserve(doc: dict[str, Any], version: str) -> None:
    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads(
        (schema_dir / f"v{version}-local-strict" / "_definitions.json").read_text()
    )
    schema = json.loads(KSERVE_SCHEMA.read_text())
    registry = referencing.Registry().with_resources(
        [
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
            (schema["$id"], referencing.Resource.from_contents(schema)),
        ]
    )
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def validate(doc: dict[str, Any], version: str) -> None:
    if doc["kind"] == "InferenceService":
        validate_kserve(doc, version)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


# Schemas


def test_every_manifest_kind_is_present() -> None:
    kinds = sorted({doc["kind"] for _, doc in DOCS})
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "InferenceService",
        "PersistentVolumeClaim",
        "Service",
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), DOCS, ids=IDS)
def test_manifests_match_the_kubernetes_schemas(name: str, doc: dict, version: str) -> None:
    validate(doc, version)


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_validation_rejects_a_misspelt_field(kind: str) -> None:
    doc = json.loads(json.dumps(by_kind(kind)[0]))
    spec = doc["spec"]["template"]["spec"] if kind == "Deployment" else doc["spec"]["predictor"]
    spec["containers"][0]["readinesProbe"] = spec["containers"][0].pop("readinessProbe")
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(doc, VERSIONS[-1])


# Agreement with serve


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _image_port() -> str:
    final = docker_stages(parse_dockerfile(DOCKERFILES[0]))[-1]
    return env_of(final)["TENSORFERRY_PORT"]


@pytest.mark.parametrize("index", range(len(pod_specs())))
def test_args_and_env_are_real_serve_options(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = pod_specs()[index]
    (container,) = spec["containers"]
    args, env = container["args"], _env(container)
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    assert set(flags) <= FLAGS, f"not serve flags: {set(flags) - FLAGS}"
    unknown = {k for k in env if k.startswith("TENSORFERRY_")} - ENVVARS - ENTRYPOINT_ENV
    assert not unknown, f"not serve variables: {unknown}"
    assert set(env) <= ENVVARS | ENTRYPOINT_ENV | KSERVE_ENV
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # serve's own parser accepts them, types and all.
    context = COMMAND.make_context("serve", list(args))
    engine = Path(context.params["engine"])
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])] + ["/mnt/models"]
    assert any(engine.is_relative_to(m) for m in mounts), f"{engine} is on no volume"


@pytest.mark.parametrize("index", range(len(pod_specs())))
def test_ports_probes_and_scrape_config_agree(index: int) -> None:
    spec, pod_annotations = pod_specs()[index]
    (container,) = spec["containers"]
    port = int(_env(container).get("TENSORFERRY_PORT", _image_port()))
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    names = {declared.get("name"): port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            target = container[probe]["httpGet"]["port"]
            assert names.get(target, target) == port, probe
    assert pod_annotations["prometheus.io/scrape"] == "true"
    assert int(pod_annotations["prometheus.io/port"]) == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_services_and_autoscalers_point_at_the_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    for service in by_kind("Service"):
        pods = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        names = {p["name"] for p in pods[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert all(p["targetPort"] in names for p in service["spec"]["ports"])
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        grace = next(p.default for p in COMMAND.params if p.name == "grace_s")
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_gpu_deployment_asks_for_a_gpu_and_cpu_one_does_not() -> None:
    for deployment in by_kind("Deployment"):
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        wants_gpu = deployment["metadata"]["name"].endswith("-gpu")
        assert ("nvidia.com/gpu" in resources.get("limits", {})) == wants_gpu
        assert "cpu" in resources["requests"]


def test_probe_and_scrape_paths_answer_on_a_real_server(entrypoint_server: ServerProcess) -> None:
    paths = set()
    for spec, pod_annotations in pod_specs():
        container = spec["containers"][0]
        paths |= {container[p]["httpGet"]["path"] for p in container if p.endswith("Probe")}
        paths.add(pod_annotations["prometheus.io/path"])
    assert paths == {"/v2/health/live", "/v2/health/ready", "/metrics"}
    for path in sorted(paths):
        status, _ = get(entrypoint_server.url + path)
        assert status == 200, path


def test_autoscaler_custom_metric_is_exported(entrypoint_server: ServerProcess) -> None:
    _, body = get(entrypoint_server.url + "/metrics")
    exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in exported
