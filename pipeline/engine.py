"""The engine stage: an exported ONNX model -> a deployable engine for one explicit target.

``engine.target`` is a param, never guessed from the host: DVC caches outputs by params,
so a machine-dependent choice behind unchanged params would hand one host's artifact to
another, and a placeholder written where a target is unavailable would be cached as valid.

- ``onnxruntime`` (default; runs anywhere): the ONNX model optimised offline by ONNX
  Runtime at the highest level (ORT_ENABLE_ALL, host-specific) and saved.
- ``tensorrt``: a serialized TensorRT plan (see pipeline/tensorrt_build.py).

Each engine gets a sidecar ``<engine>.json`` (serving/contract.py); the engine is then
run over the test split (a sequence model's in batches of similar length, each trimmed to
its longest row) and its figures go to ``reports/engine.json``: a classifier's accuracy
and top-1 agreement with the fp32 ONNX model, a regressor's RMSE, MAE and R² and its
largest difference from the fp32 ONNX model's predictions. All outputs appear together
or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer

from pipeline import onnx_tools, quantize, tensorrt_build
from pipeline.artifacts import atomic_path, sha256_file, write_json, write_metrics
from pipeline.dataset import DEFAULT_DIR, load_meta, load_split
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.onnx_tools import ONNX_DIR as DEFAULT_ONNX
from pipeline.onnx_tools import VARIANT_FILES
from pipeline.params import EngineParams, load_with_overrides
from serving import denormals
from serving.compat import EngineError
from serving.contract import LOGITS_NAME, REGRESSION, SIDECAR_SUFFIX, ModelContract
from serving.trt_backend import open_plan

DEFAULT_OUT = Path("models/engine")
DEFAULT_REPORT = Path("reports/engine.json")
ENGINE_FILES = {"onnxruntime": "model.optimized.onnx", "tensorrt": "model.trt"}

# a one-input model's rows, or a sequence model's inputs by name -> logits or predictions
Runner = Callable[[np.ndarray | onnx_tools.Feeds], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    """The ONNX model an engine is built from, and its contract."""

    path: Path
    contract: ModelContract

    @property
    def precision(self) -> str:
        return self.contract.precision


def resolve_source(onnx: Path, variant: str) -> Source:
    """``onnx`` is a model file, or the export directory (then pick ``variant``'s file)."""
    path = onnx / VARIANT_FILES[variant] if onnx.is_dir() else onnx
    if onnx.is_dir() and not path.is_file():
        raise StageError(
            f"{onnx} has no {variant} model ({path.name}); add {variant} to export.variants "
            "and rerun the export stage"
        )
    return Source(path, onnx_tools.read_contract(path))


def fp32_reference(source: Source) -> Path | None:
    """The fp32 export the engine is compared with: the source itself, or model.onnx beside it."""
    if source.precision == "fp32":
        return source.path
    sibling = source.path.with_name(VARIANT_FILES["fp32"])
    return sibling if sibling.is_file() else None


# Targets


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A target whose prerequisites hold: ``build(engine, sidecar)`` writes both, returns a runner.

    Preparing writes nothing, so a missing TensorRT, GPU or input leaves no trace.
    """

    source: Source
    build: Callable[[Path, Path], Runner]


def prepare_onnxruntime(onnx: Path, params: EngineParams) -> Prepared:
    source = resolve_source(onnx, params.precision)
    check_precision(source, params.precision)
    check_flush(params.flush_denormals)

    def build(engine_path: Path, sidecar_path: Path) -> Runner:
        return optimize_onnxruntime(source, params, engine_path, sidecar_path)

    return Prepared(source, build)


@step("optimise")
def optimize_onnxruntime(
    source: Source, params: EngineParams, engine_path: Path, sidecar_path: Path
) -> Runner:
    """ONNX Runtime's offline optimisation: ORT_ENABLE_ALL, saved as an ONNX file.

    The saved graph holds fused and layout-transformed (NCHWc) kernels chosen for this
    CPU and this onnxruntime version, so the sidecar records both. An int8 source first
    has its ReLUs folded into the quantization (quantize.fold_relus_for_cpu).
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        model = onnx_tools.load_model(source.path)
        folded = quantize.fold_relus_for_cpu(model) if source.precision == "int8" else 0
        staged = Path(tmp) / source.path.name
        onnx.save_model(model, str(staged))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(engine_path)
        options.log_severity_level = 3  # its "hardware specific" warning is why the sidecar
        try:
            ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind types
            first = str(exc).strip().splitlines()[0]
            raise StageError(f"{source.path} does not load in ONNX Runtime: {first}") from None
    sess = onnx_tools.session(engine_path, params.threads, params.flush_denormals)
    sidecar = {
        "format": "onnxruntime",
        "metadata": source.contract.to_metadata(),
        "class_names": list(source.contract.class_names),
        "precision": source.precision,
        "onnxruntime_version": ort.__version__,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "relus_folded_into_quantization": folded,
        "host": host_description(),
        **onnx_tools.io_specs(sess),
        "onnx_file": source.path.name,
        "onnx_sha256": sha256_file(source.path),
        denormals.SIDECAR_KEY: params.flush_denormals,
    }
    write_json(sidecar_path, sidecar)

    def run(x: np.ndarray | onnx_tools.Feeds) -> np.ndarray:
        with denormals.flushed(params.flush_denormals):  # this thread calls session.run
            return onnx_tools.run_logits(sess, x, params.max_batch)

    return run


def prepare_tensorrt(onnx: Path, params: EngineParams, data_dir: Path | None = None) -> Prepared:
    """``data_dir``: a sequence model's profile is tuned for its median length."""
    trt = tensorrt_build.require_tensorrt()
    gpu = tensorrt_build.require_cuda_gpu()
    tensorrt_build.require_cuda_python()
    tensorrt_build.check_options(params, gpu.compute_capability)
    major = tensorrt_build.major_version(trt.__version__)
    typed = tensorrt_build.typed_fp16(resolve_source(onnx, "fp32").contract)
    plan = tensorrt_build.plan_build(major, params.precision, typed_fp16=typed)
    source = resolve_source(onnx, plan.variant)
    tensorrt_build.check_source(plan, source.precision, source.path, major)
    if source.precision == "int8":
        graph = onnx_tools.load_model(source.path).graph
        fix = tensorrt_build.int8_fix(source.contract)
        tensorrt_build.check_int8_form({n.op_type for n in graph.node}, source.path, fix)
    profile = _profile(source, params, data_dir)
    cache = None
    if params.timing_cache:
        cache = tensorrt_build.timing_cache_file(
            Path(params.timing_cache), gpu.name, gpu.compute_capability, trt.__version__
        )

    def build(engine_path: Path, sidecar_path: Path) -> Runner:
        serialized, io = tensorrt_build.build_serialized(
            trt, source.path, plan, profile, params, cache
        )
        engine_path.write_bytes(serialized)
        sidecar = tensorrt_build.make_sidecar(
            source.contract,
            plan,
            params,
            tensorrt_version=trt.__version__,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            profile=profile,
            io=io,
            onnx_file=source.path.name,
            onnx_sha256=sha256_file(source.path),
        )
        write_json(sidecar_path, sidecar)
        output = onnx_tools.primary_output(source.contract)
        return lambda x: plan_logits(serialized, sidecar, engine_path, x, output)

    return Prepared(source, build)


def _profile(
    source: Source, params: EngineParams, data_dir: Path | None
) -> tensorrt_build.Profile | dict[str, tensorrt_build.Profile]:
    """An image or tabular model's one profile, or one per input of a sequence model."""
    sequence = source.contract.sequence
    if sequence is None:
        return tensorrt_build.profile_shapes(
            tensorrt_build.fixed_input_shape(source.contract), params
        )
    stats = load_meta(data_dir).length_stats if data_dir is not None else {}
    graph = onnx_tools.load_model(source.path).graph
    shapes = {
        i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in graph.input
    }
    return tensorrt_build.sequence_profiles(shapes, sequence, stats.get("median"), params)


def plan_logits(
    plan: bytes,
    sidecar: dict[str, Any],
    engine_path: Path,
    x: np.ndarray | onnx_tools.Feeds,
    output: str = LOGITS_NAME,
) -> np.ndarray:
    """``output`` (logits, or a regressor's prediction) for ``x`` from the server's own
    TensorRT runner, closed afterwards.

    The runner takes chunks of the profile's max batch and pads the last one up to its min
    batch; the padding's outputs are dropped.
    """
    try:
        with contextlib.closing(open_plan(plan, sidecar, engine_path)) as runner:
            inputs = x if isinstance(x, Mapping) else {runner.signature.inputs[0].name: x}
            return runner.run(dict(inputs))[output].astype(np.float32, copy=False)
    except EngineError as exc:
        raise StageError(f"running the TensorRT plan over the test split: {exc}") from None


def prepare(onnx: Path, params: EngineParams, data_dir: Path | None) -> Prepared:
    if params.target == "tensorrt":
        return prepare_tensorrt(onnx, params, data_dir)
    return prepare_onnxruntime(onnx, params)


def check_flush(flush_denormals: bool) -> None:
    if not flush_denormals:
        return
    try:
        denormals.require()
    except EngineError as exc:
        raise StageError(f"engine.flush_denormals: {exc}") from None


def check_precision(source: Source, precision: str) -> None:
    if source.precision != precision:
        raise StageError(
            f"{source.path.name} is an {source.precision} model but engine.precision is "
            f"{precision}; pass {VARIANT_FILES[precision]} or set the precision to match"
        )


def host_description() -> dict[str, str]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"machine": platform.machine(), "cpu": cpu, "system": platform.system()}


# The stage


@contextlib.contextmanager
def staged_outputs(out: Path, target: str) -> Iterator[tuple[Path, Path]]:
    """Yield (engine, sidecar) paths to write; both are published together on success.

    ``out`` with a suffix is the engine file itself (sidecar beside it); without one it is
    a directory that will hold exactly the engine and its sidecar.
    """
    if out.suffix:
        sidecar = out.with_name(out.name + SIDECAR_SUFFIX)
        with atomic_path(out) as engine_tmp, atomic_path(sidecar) as sidecar_tmp:
            yield engine_tmp, sidecar_tmp
        return
    with atomic_path(out) as tmp:
        tmp.mkdir()
        name = ENGINE_FILES[target]
        yield tmp / name, tmp / (name + SIDECAR_SUFFIX)


@step("accuracy run")
def evaluate_engine(run: Runner, source: Source, data_dir: Path, batch_size: int) -> dict[str, Any]:
    """The test split's figures (accuracy, or a regressor's RMSE, MAE and R²) and how the
    engine compares with the fp32 ONNX model (when present)."""
    meta = load_meta(data_dir)
    check_task(source, meta.task, data_dir)
    test = load_split("test", data_dir, meta)
    runs = _split_runner(source, test, meta.kind, data_dir, batch_size)
    outputs = runs(run)
    regression = source.contract.task == REGRESSION
    figures: dict[str, Any] = {
        onnx_tools.row_noun(source.contract): len(test.y),
        **_scores(outputs, test.y, regression),
    }
    reference = fp32_reference(source)
    if reference is not None:
        sess = onnx_tools.session(reference)
        fp32 = runs(lambda x: onnx_tools.run_logits(sess, x, batch_size))
        figures |= _versus_fp32(outputs, fp32, test.y, regression)
    return figures


def _scores(outputs: np.ndarray, y: np.ndarray, regression: bool) -> dict[str, float]:
    if regression:
        return onnx_tools.regression_metrics(outputs, y)
    return {"accuracy": onnx_tools.accuracy(outputs, y)}


def _versus_fp32(
    outputs: np.ndarray, fp32: np.ndarray, y: np.ndarray, regression: bool
) -> dict[str, float]:
    """The fp32 ONNX model's score, how far the engine falls from it, and the largest
    difference between their outputs (logits, or predictions in target units)."""
    mine, theirs = _scores(outputs, y, regression), _scores(fp32, y, regression)
    max_diff = float(np.abs(outputs - fp32).max())
    if regression:
        rmse, fp32_rmse = mine["rmse"], theirs["rmse"]
        return {
            "fp32_onnx_rmse": fp32_rmse,
            "rmse_increase_pct": round(onnx_tools.percent_increase(rmse, fp32_rmse), 6),
            "max_abs_diff_fp32": max_diff,
        }
    return {
        "fp32_onnx_accuracy": theirs["accuracy"],
        "accuracy_drop_pp": round((theirs["accuracy"] - mine["accuracy"]) * 100, 6),
        "top1_agreement_fp32": onnx_tools.agreement(outputs, fp32),
        "max_abs_logit_diff_fp32": max_diff,
    }


def check_task(source: Source, task: str, data_dir: Path) -> None:
    """Regression data for a regressor, class labels for a classifier."""
    if (task == "regression") != (source.contract.task == REGRESSION):
        raise StageError(
            f"{data_dir} holds {task} data, but {source.path.name} is a "
            f"{source.contract.task} model"
        )


def _split_runner(
    source: Source, test: Any, kind: str, data_dir: Path, batch_size: int
) -> Callable[[Runner], np.ndarray]:
    """How a runner goes over the test split: all rows at once (the runner batches), or
    a sequence model's rows by length in trimmed batches."""
    sequence = source.contract.sequence
    if sequence is None:
        shape = tensorrt_build.fixed_input_shape(source.contract)
        if tuple(test.x.shape[1:]) != shape:
            noun = onnx_tools.row_noun(source.contract)
            raise StageError(
                f"{data_dir} test {noun} are {list(test.x.shape[1:])}, the model takes "
                f"{list(shape)}"
            )
        return lambda run: run(test.x)
    if kind != sequence.kind or test.x.shape[-1] > sequence.max_length:
        raise StageError(
            f"{data_dir} holds {kind} data of length {test.x.shape[-1]}, the model takes "
            f"{sequence.kind} of at most {sequence.max_length} steps"
        )
    return lambda run: onnx_tools.by_length(run, kind, test.x, test.lengths, batch_size)


def build_engine(
    params: EngineParams,
    onnx: Path = DEFAULT_ONNX,
    out: Path = DEFAULT_OUT,
    data_dir: Path | None = DEFAULT_DIR,
    report_path: Path | None = DEFAULT_REPORT,
) -> dict[str, Any]:
    """Run the engine stage; ``data_dir=None`` skips the test-split run."""
    tensorrt_build.check_batches(params.min_batch, params.opt_batch, params.max_batch)
    if not onnx.exists():
        raise StageError(f"{onnx} not found; run the export stage first")
    prepared = prepare(onnx, params, data_dir)
    source = prepared.source
    start = time.perf_counter()
    with staged_outputs(out, params.target) as (engine_path, sidecar_path):
        with step("build"):
            run = prepared.build(engine_path, sidecar_path)
        report: dict[str, Any] = {
            "target": params.target,
            "precision": params.precision,
            "source": source.path.name,
            "engine_bytes": engine_path.stat().st_size,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        if data_dir is not None:
            report |= evaluate_engine(run, source, data_dir, params.max_batch)
    if report_path is not None:
        write_metrics(report_path, report)
    return report


def _source_precision(onnx: Path) -> str | None:
    """With a single ONNX file and no --precision, the engine keeps the file's precision."""
    return None if onnx.is_dir() or not onnx.is_file() else onnx_tools.read_contract(onnx).precision


Target = Literal["onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8"]
HardwareLevel = Literal["none", "ampere_plus", "same_compute_capability"]


@exit_on_stage_error
def command(
    onnx: Annotated[
        Path,
        typer.Option(
            help="ONNX model file, or the export directory (then the file for --precision "
            "is picked)."
        ),
    ] = DEFAULT_ONNX,
    target: Annotated[
        Target | None,
        typer.Option(
            help="onnxruntime: offline-optimised ONNX for this CPU; tensorrt: a TensorRT "
            "plan (needs TensorRT and an NVIDIA GPU) [params: engine.target, onnxruntime]."
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Engine file (e.g. model.trt; sidecar model.trt.json beside it), or a "
            "directory without a suffix that will hold both."
        ),
    ] = DEFAULT_OUT,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Engine precision. TensorRT 10 builds fp16 from the fp32 ONNX; TensorRT 11 "
            "and int8 need the matching export variant [params: engine.precision; with an "
            "ONNX file, that file's precision]."
        ),
    ] = None,
    min_batch: Annotated[
        int | None, typer.Option(help="TensorRT profile: smallest batch [engine.min_batch].")
    ] = None,
    opt_batch: Annotated[
        int | None, typer.Option(help="TensorRT profile: batch to tune for [engine.opt_batch].")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="TensorRT profile: largest batch [engine.max_batch].")
    ] = None,
    workspace_mib: Annotated[
        int | None, typer.Option(help="TensorRT builder memory-pool limit in MiB.")
    ] = None,
    hardware_compatibility: Annotated[
        HardwareLevel | None,
        typer.Option(help="TensorRT: plan runs on other GPUs (ampere_plus; slower)."),
    ] = None,
    version_compatible: Annotated[
        bool | None,
        typer.Option(
            "--version-compatible/--no-version-compatible",
            help="TensorRT: plan also runs on later TensorRT releases of the same major.",
        ),
    ] = None,
    timing_cache: Annotated[
        str | None,
        typer.Option(help='TensorRT: directory of the persistent timing cache ("" disables).'),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Prepared data whose test split the engine is run over.")
    ] = DEFAULT_DIR,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="Run the built engine over the test split and report accuracy (regressors: "
            "RMSE, MAE, R²)."
        ),
    ] = True,
    report: Annotated[
        Path, typer.Option(help="Where to write the JSON report (DVC metrics).")
    ] = DEFAULT_REPORT,
    params_file: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="params.yaml to read the `engine` section from (default: ./params.yaml "
            "when it exists, else built-in defaults). Options above override it.",
        ),
    ] = None,
) -> None:
    """Build an engine from an exported ONNX model for an explicit target, run it over
    the test split, and write it with its sidecar JSON."""
    params = load_with_overrides(
        "engine",
        EngineParams,
        params_file,
        target=target,
        precision=precision or _source_precision(onnx),
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=workspace_mib,
        hardware_compatibility=hardware_compatibility,
        version_compatible=version_compatible,
        timing_cache=timing_cache,
    )
    if params.timing_cache == "":
        params = dataclasses.replace(params, timing_cache=None)
    result = build_engine(params, onnx, out, data_dir if evaluate else None, report)
    summary = (
        f"built {result['target']} {result['precision']} engine from {result['source']} -> {out}"
    )
    typer.echo(summary + _figures(result))


def _figures(result: dict[str, Any]) -> str:
    """The summary's test-split figures, as far as the run produced them."""
    text = ""
    if "accuracy" in result:
        text += f"; test accuracy {result['accuracy']:.2%}"
    if "top1_agreement_fp32" in result:
        text += f", top-1 agreement with fp32 ONNX {result['top1_agreement_fp32']:.2%}"
    if "rmse" in result:
        text += f"; test rmse {result['rmse']:.4g}, mae {result['mae']:.4g}, r2 {result['r2']:.3f}"
    if "max_abs_diff_fp32" in result:
        text += f", max |diff| with fp32 ONNX {result['max_abs_diff_fp32']:.3g}"
    return text


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
