"""Routes: the Open Inference Protocol v2 REST API, /v1/classify, /v1/predict and /metrics.

Status codes follow Triton: 400 bad request, 401 missing or wrong API key (when one is
set), 404 unknown model or route, 405 wrong method, 408/413/431 stalled request, body or
headers too large (serving.http), 503 not ready / queue full (with Retry-After), 504 queue
timeout, 500 backend failure.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import zlib
from dataclasses import dataclass
from time import perf_counter
from typing import Any
from urllib.parse import unquote

import numpy as np

from serving import classify, openapi, sequence, tabular
from serving.backends import Backend
from serving.config import MODEL_NAME, ServerConfig
from serving.contract import (
    IMAGE_CLASSIFICATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TABULAR_CLASSIFICATION,
    ImagePreprocessing,
    ModelContract,
    TensorSpec,
)
from serving.http import Request
from serving.metrics import CONTENT_TYPE, Metrics
from serving.protocol import InferCodec, InferRequest, ProtocolError, batch_group
from serving.scheduler import BackendFailure, QueueTimeout, Scheduler
from serving.sequence import SequenceInputs, TextEncoder


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorferry")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


log = logging.getLogger("serving")

RETRY = {"Retry-After": "1"}
# The spec's health bodies. Triton sends none and tritonclient reads only the status, but
# KServe's InferenceRESTClient reads these fields and fails on an empty body.
LIVE = b'{"live":true}'
SERVER_READY = b'{"ready":true}'
# What may follow /v2/models/{m}[/versions/1]/, and the method each takes.
MODEL_VERBS = {"": "GET", "ready": "GET", "config": "GET", "stats": "GET", "infer": "POST"}


def served_name(config: ServerConfig, backend: Backend) -> str:
    """--model-name, else the name the artifact records, else the engine file's stem."""
    if config.model_name:
        return config.model_name
    if backend.contract is not None:
        return backend.contract.model_name
    stem = config.engine.stem
    if not MODEL_NAME.fullmatch(stem):
        raise ValueError(
            f"engine file stem {stem!r} cannot name a model in URLs (1-128 letters, digits, "
            "'_', '.' or '-'); pass --model-name"
        )
    return stem


def _config_tensor(spec: TensorSpec, batching: bool) -> dict[str, Any]:
    """A tensor as Triton's model config spells it: dims without the batch dim."""
    datatype = "STRING" if spec.datatype == "BYTES" else spec.datatype
    dims = spec.shape[1:] if batching else spec.shape
    return {"name": spec.name, "data_type": "TYPE_" + datatype, "dims": list(dims)}


@dataclass
class State:
    ready: bool = False
    draining: bool = False
    inflight: int = 0


class App:
    def __init__(
        self,
        config: ServerConfig,
        backend: Backend,
        scheduler: Scheduler,
        metrics: Metrics,
        sequence: SequenceInputs | None = None,
        text: TextEncoder | None = None,
    ) -> None:
        """``sequence``: a sequence model's request rules and batch groups; ``text``: the
        tokenizer of a text model (``serving.server.sequence_rules`` builds both)."""
        self.config = config
        self.backend = backend
        self.scheduler = scheduler
        self.metrics = metrics
        self.state = State()
        self.name = served_name(config, backend)
        self.signature = signature = backend.signature
        # Triton's max_batch_size: 0 means the model has no batch dim.
        self.max_batch_size = config.max_batch_size if signature.batching else 0
        contract = backend.contract
        class_names = contract.class_names if contract else ()
        self._sequence, self._text = sequence, text
        self._tabular = tabular.encoder(contract, signature)
        self._codec = InferCodec(self.name, signature, config.max_batch_size, class_names, sequence)
        self._version = _version()
        self._api_key = None if config.api_key is None else config.api_key.encode()
        self._public = set(config.public_routes)
        self._model_ready = json.dumps({"name": self.name, "ready": True}).encode()
        self._model_verbs: dict[str, str] = {}  # path after /v2/models/ -> verb; see _model_verb
        # Read at scrape time: free on the request path.
        metrics.pending.set_function(lambda: scheduler.queued)
        metrics.inflight.set_function(lambda: self.state.inflight)
        self._routes = {
            "/v2/health/live": ("GET", lambda r: r.respond(200, [LIVE])),
            "/v2/health/ready": ("GET", lambda r: self._ready(r, SERVER_READY)),
            "/v2": ("GET", lambda r: r.respond_json(200, self._server_metadata())),
            "/metrics": ("GET", lambda r: r.respond(200, [metrics.render()], CONTENT_TYPE)),
            "/v2/openapi.json": ("GET", lambda r: r.respond_json(200, self._openapi())),
            "/v1/classify": ("POST", self._classify),
            "/v1/predict": ("POST", self._predict),
        }

    def __call__(self, request: Request) -> None:
        path = request.path
        if self._api_key is not None and not self._authorized(request):
            return
        if path.startswith("/v2/models/"):
            return self._model_route(request, path[len("/v2/models/") :])
        route = self._routes.get(path.rstrip("/") or path)
        if route is None:
            return request.error(404, "Not Found")
        method, handler = route
        if request.method != method:
            return request.error(405, f"{path} takes {method}, not {request.method}")
        handler(request)

    def _authorized(self, request: Request) -> bool:
        """Check the bearer token (or a public route); answer 401 if it fails."""
        if (request.path.rstrip("/") or "/") in self._public:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: how long the check takes says nothing about how close a guess was.
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), self._api_key or b""
        ):
            return True
        challenge = 'Bearer realm="tensorferry"'
        if token:
            challenge += ', error="invalid_token"'
        request.error(401, "missing or wrong API key", {"WWW-Authenticate": challenge})
        return False

    # metadata and health
    def _ready(self, request: Request, body: bytes) -> None:
        if self.state.ready:
            request.respond(200, [body])
        else:
            request.error(503, "not ready", RETRY)

    def _server_metadata(self) -> dict[str, Any]:
        return {
            "name": "tensorferry",
            "version": self._version,
            "extensions": ["binary_tensor_data", "classification", "statistics"],
        }

    def _openapi(self) -> dict[str, Any]:
        contract, encoder = self.backend.contract, self._tabular
        return openapi.document(
            self.name,
            self._version,
            self.signature,
            self.config.max_batch_size,
            classify=self._classify_kind,
            max_texts=self.config.max_batch_size,
            records=encoder.preprocessing if encoder and self._predicts else None,
            regression=contract is not None and contract.task == REGRESSION,
        )

    def _model_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.backend.platform,
            "inputs": [s.to_json() for s in self.signature.inputs],
            "outputs": [s.to_json() for s in self.signature.outputs],
        }

    def _model_config(self) -> dict[str, Any]:
        """Triton's model config, as perf_analyzer and tritonclient read it."""
        batching, contract = self.signature.batching, self.backend.contract
        image_input = contract.image.input_name if contract and contract.image else None
        inputs = []
        for spec in self.signature.inputs:
            entry = _config_tensor(spec, batching)
            if spec.name == image_input:
                entry["format"] = "FORMAT_NCHW"
            inputs.append(entry)
        on_gpu = self.backend.info["provider"] in ("cuda", "tensorrt")
        config: dict[str, Any] = {
            "name": self.name,
            "platform": self.backend.platform,
            "backend": self.backend.info["backend"],
            "max_batch_size": self.max_batch_size,
            "input": inputs,
            "output": [_config_tensor(s, batching) for s in self.signature.outputs],
            "instance_group": [
                {"count": self.config.instances, "kind": "KIND_GPU" if on_gpu else "KIND_CPU"}
            ],
        }
        if batching:  # Triton refuses dynamic batching for a model without a batch dim
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": self.config.max_queue_delay_us,
                "default_queue_policy": {
                    "max_queue_size": self.config.max_queue_size,
                    "default_timeout_microseconds": self.config.timeout_ms * 1000,
                    "timeout_action": "REJECT",
                },
            }
        metadata = contract.to_metadata() if contract else {}
        if self._sequence is not None:  # not Triton's "sequence_batching" (stateful models)
            policy = "equal" if not self._sequence.pad else self.config.sequence_batching
            metadata["tensorferry.batching"] = policy
        config["parameters"] = {k: {"string_value": v} for k, v in metadata.items()}
        return config

    def _model_route(self, request: Request, rest: str) -> None:
        verb = self._model_verbs.get(rest)
        if verb is None and (verb := self._model_verb(request, rest)) is None:
            return  # answered 404
        method = MODEL_VERBS[verb]
        if request.method != method:
            return request.error(405, f"{verb or 'metadata'} takes {method}, not {request.method}")
        if verb == "infer":
            return self._infer(request)
        if verb == "ready":
            return self._ready(request, self._model_ready)
        if verb == "stats":
            return request.respond_json(200, {"model_stats": [self.metrics.statistics(self.name)]})
        request.respond_json(
            200, self._model_config() if verb == "config" else self._model_metadata()
        )

    def _model_verb(self, request: Request, rest: str) -> str | None:
        """The verb a path under /v2/models/ names, or None once it is answered 404.

        Clients repeat the same few paths, so the answers for this model are remembered
        (a bounded few: percent-encoding can spell one path many ways).
        """
        parts = rest.rstrip("/").split("/")
        if parts == ["stats"]:  # Triton: every model's statistics; this server has one
            return "stats"
        name = unquote(parts[0])
        if name != self.name:
            request.error(404, f"Request for unknown model: '{name}' is not found")
            return None
        action = parts[1:]
        if action[:1] == ["versions"]:
            if len(action) < 2 or action[1] != "1":
                request.error(404, f"Request for unknown model: '{name}' has no such version")
                return None
            action = action[2:]
        verb = "/".join(action)
        if verb not in MODEL_VERBS:
            request.error(404, "Not Found")
            return None
        if len(self._model_verbs) < 64:
            self._model_verbs[rest] = verb
        return verb

    # inference
    def _admit(self, request: Request) -> bool:
        """Accept an inference request; from here it counts as in flight until answered."""
        if self.state.ready:
            self.state.inflight += 1
            return True
        self.metrics.failure["rejected"].inc()
        why = "server is shutting down" if self.state.draining else "model is not ready yet"
        request.error(503, why, RETRY)
        return False

    def _bad_request(self, request: Request, exc: Exception) -> None:
        self.state.inflight -= 1
        self.metrics.failure["bad_request"].inc()
        request.error(400, str(exc))

    def _timeout_s(self, requested_us: int | None) -> float | None:
        limit_us = self.config.timeout_ms * 1000  # 0: no server-wide limit
        if requested_us and (not limit_us or requested_us < limit_us):
            limit_us = requested_us  # a request may shorten its timeout, never lengthen it
        return limit_us / 1e6 if limit_us else None

    def _infer(self, request: Request) -> None:
        if not self._admit(request):
            return
        start = perf_counter()
        try:
            body = _decoded_body(request, self.config.max_request_bytes)
            parsed = self._codec.decode(body, _header_length(request))
            if self._sequence is not None:
                self._sequence.check_values(parsed.inputs)
        except ProtocolError as exc:
            return self._bad_request(request, exc)
        except Exception:
            self.state.inflight -= 1  # drain waits for this count; serving.http answers 500
            raise

        def done(outputs: dict[str, np.ndarray] | None, error: Exception | None) -> None:
            if outputs is not None:
                try:
                    self._respond_outputs(request, parsed, outputs)
                except Exception as exc:  # an answer that fails to encode still gets one
                    log.exception("failed to encode an infer response")
                    error = exc
            self._finish(request, error, start)

        self._submit(request, parsed.inputs, parsed.rows, parsed.group, done, parsed)

    def _respond_outputs(
        self, request: Request, parsed: InferRequest, outputs: dict[str, np.ndarray]
    ) -> None:
        parts, header_length = self._codec.encode(parsed, outputs)
        if header_length is None:
            request.respond(200, parts)
            return
        extra = {"Inference-Header-Content-Length": str(header_length)}
        request.respond(200, parts, "application/octet-stream", extra)

    def _submit(
        self,
        request: Request,
        inputs: dict[str, np.ndarray],
        rows: int,
        group: tuple,
        done: Any,
        parsed: InferRequest | None,
    ) -> bool:
        timeout = self._timeout_s(parsed.timeout_us if parsed else None)
        if not self.scheduler.submit(inputs, rows, done, timeout, group):
            self.state.inflight -= 1
            self.metrics.failure["rejected"].inc()
            request.error(503, "Exceeds maximum queue size", RETRY)
            return False
        return True

    def _finish(self, request: Request, error: Exception | None, start: float) -> None:
        """Account for an answered request; answer it if ``error`` says it failed."""
        self.state.inflight -= 1
        elapsed = perf_counter() - start
        if error is None:
            self.metrics.success.inc()
        else:
            self.metrics.failed.add(elapsed)
            if isinstance(error, QueueTimeout):
                self.metrics.failure["timeout"].inc()
                request.error(504, str(error))
            else:
                self.metrics.failure["backend"].inc()
                message = str(error) if isinstance(error, BackendFailure) else repr(error)
                request.error(500, message)
        self.metrics.request_seconds.observe(elapsed)

    # classify
    @property
    def _classify_kind(self) -> str | None:
        """What /v1/classify takes for this model: "image", "text", "tabular" or None (not
        offered)."""
        contract = self.backend.contract
        if contract and contract.image and contract.task == IMAGE_CLASSIFICATION:
            return "image"
        if contract and self._text is not None and contract.task == SEQUENCE_CLASSIFICATION:
            return "text"
        if contract and self._tabular is not None and contract.task == TABULAR_CLASSIFICATION:
            return "tabular"
        return None

    @property
    def _predicts(self) -> bool:
        """Whether /v1/predict is offered: a tabular classifier or regressor."""
        contract = self.backend.contract
        tasks = (TABULAR_CLASSIFICATION, REGRESSION)
        return self._tabular is not None and contract is not None and contract.task in tasks

    def _what(self) -> str:
        """The model's task in words, for a 404 that says why a route does not fit it."""
        contract = self.backend.contract
        task = contract.task if contract else None
        if contract and contract.sequence:
            task = f"{contract.sequence.kind} {task}"
        return f"a {task} model" if task else "a model without task metadata"

    def _classify(self, request: Request) -> None:
        kind, contract = self._classify_kind, self.backend.contract
        if contract is not None and contract.task == REGRESSION:
            predict = "POST /v1/predict or " if self._predicts else ""
            return request.error(
                404,
                f"/v1/classify serves classifiers; model '{self.name}' is a regression model, "
                f"which returns values, not classes: use {predict}"
                f"POST /v2/models/{self.name}/infer",
            )
        if kind is None or contract is None:
            return request.error(
                404,
                f"/v1/classify serves image, text and tabular classifiers; model '{self.name}' "
                f"is {self._what()}: use POST /v2/models/{self.name}/infer",
            )
        if kind == "text":
            return self._classify_text(request, contract)
        if kind == "tabular":
            return self._records(request, contract, top_k=True)
        assert contract.image is not None
        if self._admit(request):
            asyncio.get_running_loop().create_task(
                self._classify_async(request, contract, contract.image)
            )

    async def _classify_async(
        self, request: Request, contract: ModelContract, image: ImagePreprocessing
    ) -> None:
        start = perf_counter()
        loop = asyncio.get_running_loop()
        try:
            k = classify.parse_top_k(request.query, len(contract.class_names))
            data = classify.image_bytes(request.body, request.headers.get("content-type", ""))
            # Decoding can take milliseconds: keep it off the event loop.
            array = await loop.run_in_executor(None, classify.preprocess, data, image)
        except ProtocolError as exc:
            return self._bad_request(request, exc)
        except Exception as exc:  # a task that dies unanswered would leave its client hanging
            log.exception("classify failed before inference")
            return self._finish(request, exc, start)
        answered: asyncio.Future[tuple[Any, Exception | None]] = loop.create_future()
        inputs = {image.input_name: array}
        group = batch_group(self.signature, [array])  # the group infer forms
        if not self._submit(
            request, inputs, 1, group, lambda o, e: answered.set_result((o, e)), None
        ):
            return
        outputs, error = await answered
        if outputs is not None:
            ranked = classify.top_k(classify.probabilities(outputs)[0], contract.class_names, k)
            request.respond_json(200, {"model_name": self.name, "predictions": ranked})
        self._finish(request, error, start)

    def _classify_text(self, request: Request, contract: ModelContract) -> None:
        """Tokenised here, on the event loop (tens of µs a text; an executor hop costs
        more), and queued as one request of a row per text, padded to its longest."""
        if not self._admit(request):
            return
        assert self._text is not None and self._sequence is not None
        start = perf_counter()
        try:
            k = classify.parse_top_k(request.query, len(contract.class_names))
            body = _decoded_body(request, self.config.max_request_bytes)
            content_type = request.headers.get("content-type", "")
            texts, many = sequence.texts(body, content_type, self.config.max_batch_size)
            encoded = self._text.encode(texts)
        except ProtocolError as exc:
            return self._bad_request(request, exc)
        except Exception:
            self.state.inflight -= 1  # drain waits for this count; serving.http answers 500
            raise
        inputs = {s.name: encoded[s.name] for s in self.signature.inputs}

        def done(outputs: dict[str, np.ndarray] | None, error: Exception | None) -> None:
            if outputs is not None:
                answer = classify.ranked(outputs, contract.class_names, k, many)
                request.respond_json(200, {"model_name": self.name, **answer})
            self._finish(request, error, start)

        group = self._sequence.group(list(inputs.values()))
        self._submit(request, inputs, len(texts), group, done, None)

    # tabular
    def _predict(self, request: Request) -> None:
        contract = self.backend.contract
        if not self._predicts or contract is None:
            other = "POST /v1/classify or " if self._classify_kind else ""
            return request.error(
                404,
                "/v1/predict serves tabular models (tabular_classification and regression on "
                f"records of named columns); model '{self.name}' is {self._what()}: use "
                f"{other}POST /v2/models/{self.name}/infer",
            )
        self._records(request, contract, top_k=False)

    def _records(self, request: Request, contract: ModelContract, top_k: bool) -> None:
        """Records to the features tensor, queued as one request of a row per record (the
        batch group infer forms), answered as /v1/classify (``top_k``) or /v1/predict."""
        if not self._admit(request):
            return
        assert self._tabular is not None
        start = perf_counter()
        try:
            k = classify.parse_top_k(request.query, len(contract.class_names)) if top_k else 1
            body = _decoded_body(request, self.config.max_request_bytes)
            items, many = tabular.records(body, self.config.max_batch_size)
            features = self._tabular.encode(items, many)
        except ProtocolError as exc:
            return self._bad_request(request, exc)
        except Exception:
            self.state.inflight -= 1  # drain waits for this count; serving.http answers 500
            raise

        def done(outputs: dict[str, np.ndarray] | None, error: Exception | None) -> None:
            if outputs is not None:
                try:
                    if top_k:
                        answer = classify.ranked(outputs, contract.class_names, k, many)
                    else:
                        answer = {"predictions": tabular.predictions(outputs, contract)}
                    request.respond_json(200, {"model_name": self.name, **answer})
                except Exception as exc:  # an answer that fails to encode still gets one
                    log.exception("failed to encode a tabular response")
                    error = exc
            self._finish(request, error, start)

        inputs = {self._tabular.input_name: features}
        group = batch_group(self.signature, [features])
        self._submit(request, inputs, len(items), group, done, None)


def _header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ProtocolError(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)


def _decoded_body(request: Request, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return request.body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        body = inflater.decompress(request.body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"body is not valid {encoding}: {exc}") from None
    if len(body) > limit:
        raise ProtocolError(f"decompressed body exceeds the limit of {limit} bytes")
    return body
