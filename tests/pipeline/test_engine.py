"""The engine stage: the onnxruntime target on CPU, TensorRT decisions without TensorRT,
bad input, and (marked ``tensorrt``) real TensorRT builds on GPU hosts."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from pipeline import engine, onnx_tools, quantize, tensorrt_build
from pipeline.artifacts import sha256_file
from pipeline.cli import app
from pipeline.errors import StageError
from pipeline.params import EngineParams
from serving import trt_backend
from serving.compat import EngineError, HostInfo, check_plan
from serving.contract import ModelContract
from tests.pipeline.export_fixtures import CLASS_NAMES, SHAPE, shared_export
from tests.serving import trt_stand_ins
from tests.serving.serving_helpers import build_subnormal_model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
needs_gpu = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")
FP32 = EngineParams(precision="fp32")  # the default is int8; fp32 is compared with itself


@pytest.fixture(scope="module")
def shared():
    return shared_export()


def listing(path):
    return sorted(p.name for p in path.iterdir())


# onnxruntime target


def test_onnxruntime_target_writes_optimized_model_sidecar_and_report(shared, tmp_path):
    out, report_path = tmp_path / "engine", tmp_path / "engine.json"
    report = engine.build_engine(FP32, shared.onnx_dir, out, shared.data_dir, report_path)
    assert listing(out) == ["model.optimized.onnx", "model.optimized.onnx.json"]
    written = json.loads(report_path.read_text())
    assert written == {k: v for k, v in report.items() if k != "build_seconds"}  # no wall time
    assert report["target"] == "onnxruntime" and report["source"] == "model.onnx"
    assert report["images"] == 90 and report["accuracy"] >= 0.9
    assert report["top1_agreement_fp32"] == 1.0 and report["max_abs_logit_diff_fp32"] < 1e-4
    sidecar = json.loads((out / "model.optimized.onnx.json").read_text())
    assert sidecar["format"] == "onnxruntime" and sidecar["precision"] == "fp32"
    assert sidecar["class_names"] == list(CLASS_NAMES)
    assert sidecar["inputs"] == [{"name": "images", "dtype": "UINT8", "shape": [-1, *SHAPE]}]
    assert [o["name"] for o in sidecar["outputs"]] == ["logits", "probabilities"]
    assert sidecar["onnx_sha256"] == sha256_file(shared.variant("fp32"))
    assert sidecar["onnxruntime_version"] and sidecar["host"]["machine"]
    # The optimised model still carries the contract a server reads.
    contract = onnx_tools.read_contract(out / "model.optimized.onnx")
    assert contract == ModelContract.from_metadata(sidecar["metadata"])


def test_onnxruntime_target_from_int8_file_folds_relus_and_keeps_accuracy(shared, tmp_path):
    out = tmp_path / "cpu" / "model.int8.opt.onnx"
    report = engine.build_engine(
        EngineParams(precision="int8"), shared.variant("int8"), out, shared.data_dir, None
    )
    assert listing(out.parent) == ["model.int8.opt.onnx", "model.int8.opt.onnx.json"]
    assert report["precision"] == "int8" and report["source"] == "model.int8.onnx"
    assert report["accuracy_drop_pp"] <= 1.0 and report["top1_agreement_fp32"] >= 0.97
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["relus_folded_into_quantization"] == 4  # seed_cnn: 3 convs + 1 hidden dense
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QLinearConv" in ops and "Relu" not in ops


@pytest.mark.parametrize("flush", [False, True], ids=["kept", "flushed"])
def test_flush_denormals_applies_to_the_accuracy_run_and_is_recorded(tmp_path, flush):
    """The runner the accuracy run uses, on a model whose logits are float32 subnormals."""
    source = build_subnormal_model(tmp_path / "subnormal.onnx", SHAPE)
    out = tmp_path / "engine.onnx"
    sidecar = out.with_name(out.name + ".json")
    prepared = engine.prepare_onnxruntime(
        source, EngineParams(precision="fp32", flush_denormals=flush)
    )
    logits = prepared.build(out, sidecar)(np.full((4, *SHAPE), 7, np.uint8))
    assert json.loads(sidecar.read_text())["flush_denormals"] is flush
    tiny = np.finfo(np.float32).tiny
    assert (logits == 0).all() if flush else ((logits > 0) & (logits < tiny)).all(), logits
    assert np.float32(1e-30) * np.float32(1e-10) != 0  # and this thread is as it was


def test_relu_folding_matches_the_symmetric_model(shared):
    model = onnx.load(str(shared.variant("int8")))
    assert quantize.fold_relus_for_cpu(model) == 4
    onnx.checker.check_model(model, full_check=True)
    assert not [n for n in model.graph.node if n.op_type == "Relu"]
    x = np.load(shared.data_dir / "test.npz")["x"]
    folded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    symmetric = onnx_tools.run_logits(onnx_tools.session(shared.variant("int8")), x, 64)
    fp32 = onnx_tools.run_logits(onnx_tools.session(shared.variant("fp32")), x, 64)
    logits = onnx_tools.run_logits(folded, x, 64)
    assert onnx_tools.agreement(logits, fp32) >= onnx_tools.agreement(symmetric, fp32) - 0.02
    # Finer activation steps: no further from fp32 than the symmetric model, give or take.
    assert np.abs(logits - fp32).max() <= 1.5 * np.abs(symmetric - fp32).max()


def test_engine_precision_must_match_the_onnx_file(shared, tmp_path):
    with pytest.raises(StageError, match="model.onnx is an fp32 model but engine.precision"):
        engine.build_engine(
            EngineParams(precision="int8"), shared.variant("fp32"), tmp_path / "e", None, None
        )
    assert listing(tmp_path) == []


def test_missing_variant_in_export_dir_names_the_param(shared, tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    shutil.copy(shared.variant("fp32"), onnx_dir)
    with pytest.raises(StageError, match="add int8 to export.variants"):
        engine.build_engine(EngineParams(precision="int8"), onnx_dir, tmp_path / "e", None, None)
    assert listing(tmp_path) == ["onnx"]


# Bad input: one line, nothing written


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_onnx_fails_in_one_line(shared, tmp_path, damage):
    data = shared.variant("fp32").read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\xffnot onnx" * 9)
    with pytest.raises(StageError, match="is not a readable ONNX model") as error:
        engine.build_engine(EngineParams(), bad, tmp_path / "engine", shared.data_dir, None)
    assert "\n" not in str(error.value)
    assert listing(tmp_path) == ["model.onnx"]


def test_onnx_without_metadata_is_refused(shared, tmp_path):
    model = onnx.load(str(shared.variant("fp32")))
    del model.metadata_props[:]
    bare = tmp_path / "model.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(StageError, match="lacks tensorferry metadata"):
        engine.build_engine(EngineParams(), bare, tmp_path / "engine", shared.data_dir, None)
    assert listing(tmp_path) == ["model.onnx"]


def test_profile_with_max_below_min_fails_via_cli_in_one_line(shared, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.engine", "--onnx", str(shared.onnx_dir)]
        + ["--out", str(tmp_path / "engine"), "--report", str(tmp_path / "engine.json")]
        + ["--min-batch", "8", "--max-batch", "4", "--target", "tensorrt"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params: engine batch profile needs 1 <= min_batch <= opt_batch <= max_batch, "
        "got min 8, opt 32, max 4"
    ]
    assert listing(tmp_path) == []


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_target_without_tensorrt_says_how_to_get_it(shared, tmp_path):
    with pytest.raises(StageError) as error:
        engine.build_engine(
            EngineParams(target="tensorrt"), shared.onnx_dir, tmp_path / "models" / "engine"
        )
    assert str(error.value) == tensorrt_build.TENSORRT_MISSING
    assert "pip install tensorrt" in str(error.value) and "engine.target=onnxruntime" in str(
        error.value
    )
    assert listing(tmp_path) == []


@pytest.mark.skipif(_cuda(), reason="a CUDA GPU is visible")
def test_missing_gpu_is_one_clear_line():
    with pytest.raises(StageError, match="needs an NVIDIA CUDA GPU: ") as error:
        tensorrt_build.require_cuda_gpu()
    assert "\n" not in str(error.value) and "engine.target=onnxruntime" in str(error.value)


def test_missing_cuda_python_is_one_clear_line(monkeypatch):
    for name in ("cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, name, None)  # import cuda... raises ImportError
    with pytest.raises(StageError, match="pip install cuda-python") as error:
        tensorrt_build.require_cuda_python()
    assert "\n" not in str(error.value) and "engine.target=onnxruntime" in str(error.value)


# TensorRT decisions (pure Python)


@pytest.mark.parametrize(
    ("major", "precision", "variant", "flags", "strongly_typed"),
    [
        (10, "fp32", "fp32", (), False),
        (10, "fp16", "fp32", ("FP16",), False),
        (10, "int8", "int8", ("INT8",), False),
        (11, "fp32", "fp32", (), True),
        (11, "fp16", "fp16", (), True),
        (11, "int8", "int8", (), True),
    ],
)
def test_build_plan_per_tensorrt_major(major, precision, variant, flags, strongly_typed):
    plan = tensorrt_build.plan_build(major, precision)
    assert (plan.variant, plan.flags, plan.strongly_typed) == (variant, flags, strongly_typed)


def test_tensorrt_11_refuses_fp32_onnx_for_fp16_and_names_the_file(tmp_path):
    plan = tensorrt_build.plan_build(11, "fp16")
    with pytest.raises(StageError, match=r"pass model\.fp16\.onnx \(export.variants must"):
        tensorrt_build.check_source(plan, "fp32", tmp_path / "model.onnx", 11)
    tensorrt_build.check_source(tensorrt_build.plan_build(10, "fp16"), "fp16", tmp_path, 10)
    with pytest.raises(StageError, match="not supported"):
        tensorrt_build.plan_build(8, "fp32")


@pytest.mark.parametrize(("text", "major"), [("10.3.0", 10), ("11.0.1.3", 11), ("10.16.1", 10)])
def test_major_version(text, major):
    assert tensorrt_build.major_version(text) == major


def test_profile_shapes_and_ampere_check():
    profile = tensorrt_build.profile_shapes(SHAPE, EngineParams(min_batch=2, opt_batch=8))
    assert profile.to_json() == {
        "min": [2, 1, 20, 20],
        "opt": [8, 1, 20, 20],
        "max": [64, 1, 20, 20],
    }
    with pytest.raises(StageError, match="got min 1, opt 128, max 64"):
        tensorrt_build.profile_shapes(SHAPE, EngineParams(opt_batch=128))
    with pytest.raises(StageError, match="needs an Ampere or newer GPU"):
        tensorrt_build.check_options(EngineParams(hardware_compatibility="ampere_plus"), "7.5")
    tensorrt_build.check_options(EngineParams(hardware_compatibility="ampere_plus"), "8.7")


def test_timing_cache_file_is_per_gpu_and_version(tmp_path):
    path = tensorrt_build.timing_cache_file(tmp_path, "NVIDIA H200 (SXM)", "9.0", "10.3.0")
    assert path == tmp_path / "nvidia-h200-sxm-sm90-trt10.3.0.cache"


def test_sidecar_content_and_serving_accepts_it(shared):
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    params = EngineParams(target="tensorrt", precision="fp16", version_compatible=True)
    plan = tensorrt_build.plan_build(10, "fp16")
    profile = tensorrt_build.profile_shapes(SHAPE, params)
    io = {
        "inputs": [{"name": "images", "dtype": "UINT8", "shape": [-1, *SHAPE]}],
        "outputs": [{"name": "logits", "dtype": "FP32", "shape": [-1, 3]}],
    }
    sidecar = tensorrt_build.make_sidecar(
        contract,
        plan,
        params,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        profile=profile,
        io=io,
        onnx_file="model.onnx",
        onnx_sha256="ab" * 32,
    )
    assert sidecar["format"] == "tensorrt" and sidecar["precision"] == "fp16"
    assert sidecar["builder_flags"] == ["FP16"] and sidecar["strongly_typed"] is False
    assert sidecar["profile"]["max"] == [64, *SHAPE] and sidecar["inputs"] == io["inputs"]
    assert sidecar["class_names"] == list(CLASS_NAMES) and sidecar["onnx_sha256"] == "ab" * 32
    assert ModelContract.from_metadata(sidecar["metadata"]).precision == "fp16"
    json.dumps(sidecar)  # plain JSON all the way down
    # The server's pre-flight check reads it: same host passes, another GPU is refused.
    check_plan(sidecar, HostInfo("10.3.1", "Orin", "8.7"))
    with pytest.raises(EngineError, match="rebuild the engine on this host"):
        check_plan(sidecar, HostInfo("10.3.0", "RTX 2080", "7.5"))


# CLI


def test_cli_takes_precision_from_the_onnx_file(shared, tmp_path):
    out = tmp_path / "model.int8.opt.onnx"
    result = CliRunner().invoke(
        app,
        ["build-engine", "--onnx", str(shared.variant("int8")), "--target", "onnxruntime"]
        + ["--out", str(out), "--data-dir", str(shared.data_dir)]
        + ["--report", str(tmp_path / "engine.json")],
    )
    assert result.exit_code == 0, result.output
    assert "built onnxruntime int8 engine from model.int8.onnx" in result.output
    assert json.loads((tmp_path / "engine.json").read_text())["precision"] == "int8"


# Real TensorRT builds (GPU hosts: pytest -m tensorrt, or scripts/gpu-check)


@pytest.mark.tensorrt
@needs_tensorrt
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_builds_runs_and_agrees(shared, tmp_path, precision):
    params = EngineParams(
        target="tensorrt", precision=precision, timing_cache=str(tmp_path / "cache")
    )
    out = tmp_path / "engine"
    report = engine.build_engine(params, shared.onnx_dir, out, shared.data_dir, None)
    assert listing(out) == ["model.trt", "model.trt.json"]
    assert report["accuracy"] >= 0.9 and report["top1_agreement_fp32"] >= 0.97
    sidecar = json.loads((out / "model.trt.json").read_text())
    assert sidecar["precision"] == precision and sidecar["compute_capability"]
    assert sidecar["profile"] == {"min": [1, *SHAPE], "opt": [32, *SHAPE], "max": [64, *SHAPE]}
    assert not (out / "model.trt").read_bytes().startswith(b"{"), "the plan stays pure"
    assert len(list((tmp_path / "cache").iterdir())) == 1, "timing cache persisted"
    # A second build reuses the cache and gives the same predictions.
    again = engine.build_engine(params, shared.onnx_dir, tmp_path / "again", shared.data_dir, None)
    assert again["accuracy"] == report["accuracy"]


# The test-split run: serving's runner, with stand-in tensorrt and cuda-python (CPU)


def test_the_stage_runs_the_plan_through_the_server_runner_and_closes_it(monkeypatch, tmp_path):
    cudart = trt_stand_ins.install(monkeypatch, batches=(4, 64))
    x = np.random.default_rng(0).integers(0, 256, (130, *trt_stand_ins.IMAGE), dtype=np.uint8)
    logits = engine.plan_logits(b"plan", trt_stand_ins.sidecar(), tmp_path / "model.trt", x)
    np.testing.assert_array_equal(logits, trt_stand_ins.expected_logits(x))  # 64, 64, 2 (+2 pad)
    assert cudart.memory == {} and not cudart.streams, "the runner is closed"
    with pytest.raises(StageError, match="test split: a TensorRT engine cannot run an empty"):
        engine.plan_logits(b"plan", trt_stand_ins.sidecar(), tmp_path / "model.trt", x[:0])
    assert cudart.memory == {} and not cudart.streams, "closed on error too"


def test_the_sidecar_and_the_runner_share_one_dtype_map():
    assert tensorrt_build.TRT_DATATYPES is trt_backend.TRT_DATATYPES

    def tensor(name, dtype, shape):
        return SimpleNamespace(name=name, dtype=SimpleNamespace(name=dtype), shape=shape)

    inputs = [tensor("images", "UINT8", (-1, *SHAPE))]
    outputs = [tensor("logits", "HALF", (-1, 3)), tensor("extra", "BF16", (-1, 3))]
    network = SimpleNamespace(
        num_inputs=1,
        num_outputs=2,
        get_input=inputs.__getitem__,
        get_output=outputs.__getitem__,
    )
    io = tensorrt_build.network_io(network)
    assert [spec["dtype"] for spec in io["inputs"] + io["outputs"]] == ["UINT8", "FP16", "BF16"]


def test_tensorrt_build_holds_no_runner_and_no_torch_buffers():
    tree = ast.parse(Path(tensorrt_build.__file__).read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not functions & {"run_plan", "_run_batch"}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    runner_calls = {"deserialize_cuda_engine", "set_tensor_address", "execute_async_v3"}
    torch_buffers = {"from_numpy", "empty", "data_ptr", "current_stream"}
    assert not attributes & (runner_calls | torch_buffers)
    torch_users = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(
            isinstance(inner, ast.Import) and inner.names[0].name == "torch"
            for inner in ast.walk(node)
        )
    ]
    assert torch_users == ["require_cuda_gpu"]  # torch only tells whether there is a GPU
