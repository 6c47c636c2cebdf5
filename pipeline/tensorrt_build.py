"""TensorRT plans from our ONNX models, for TensorRT 10.x (JetPack 6 ships 10.3) and 11.x.

The decisions are pure functions, tested on CPU: which ONNX variant and builder flags give
a precision on each TensorRT major (10: weak typing with FP16/INT8 flags; 11: strongly
typed only, so precision comes from the fp16 or Q/DQ int8 ONNX; tabular models and
regressors take their fp16 from the fp16 ONNX on 10.x too), the profile shapes (an image
or tabular model's over the batch, a sequence model's over the batch and the length of
every input), the sidecar, and the one-line errors for a missing TensorRT, GPU or
cuda-python. The build (``build_serialized``) needs both and is tested on GPU hosts only
(``pytest -m tensorrt``; ``scripts/gpu-check``); the built plan is run by the server's
own runner (serving/trt_backend.py), so the stage measures what will be served.

The plan stays a pure TensorRT plan: a header in front of it would make TensorRT reject
it ("Magic tag does not match"), so everything else goes into ``<plan>.json``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_path
from pipeline.errors import StageError
from pipeline.params import EngineParams
from serving.compat import EngineError
from serving.contract import REGRESSION, ModelContract, SequencePreprocessing
from serving.trt_backend import TRT_DATATYPES, cuda_runtime

TENSORRT_MISSING = (
    "engine.target=tensorrt needs TensorRT's Python package, which is not installed: "
    "`pip install tensorrt` on x86-64 with CUDA 12/13 (or use the one JetPack ships: "
    "`apt install python3-libnvinfer`), or set engine.target=onnxruntime"
)

# Pure decisions


@dataclasses.dataclass(frozen=True)
class Profile:
    """Full input shapes of the optimisation profile (batch first)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise StageError(
            "params: engine batch profile needs 1 <= min_batch <= opt_batch <= max_batch, "
            f"got min {min_batch}, opt {opt_batch}, max {max_batch}"
        )


def fixed_input_shape(contract: ModelContract) -> tuple[int, ...]:
    """The one input of an image ([C, H, W]) or tabular ([F]) model, batch excluded."""
    if contract.image is not None:
        return tuple(contract.image.shape)
    if contract.tabular is not None:
        return (len(contract.tabular.columns),)
    raise StageError(f"{contract.model_name} has no image or tabular input")


def profile_shapes(input_shape: tuple[int, ...], params: EngineParams) -> Profile:
    """The batch from params, every other dim fixed: [N, C, H, W] images, [N, F] tabular
    features (a tabular model's F is its column count, never dynamic)."""
    check_batches(params.min_batch, params.opt_batch, params.max_batch)
    shape = tuple(input_shape)
    return Profile(
        (params.min_batch, *shape), (params.opt_batch, *shape), (params.max_batch, *shape)
    )


def sequence_profiles(
    shapes: Mapping[str, list[int]],
    sequence: SequencePreprocessing,
    opt_length: int | None,
    params: EngineParams,
) -> dict[str, Profile]:
    """One profile per padded input: the batch from params, the sequence axis from the
    contract's min_length..max_length, tuned for ``opt_length`` (the data's median length;
    None: halfway). ``shapes``: the graph's input shapes, -1 for a dynamic dim."""
    check_batches(params.min_batch, params.opt_batch, params.max_batch)
    low, high = sequence.min_length, sequence.max_length
    opt = (low + high) // 2 if opt_length is None else min(max(opt_length, low), high)
    if not 1 <= low <= high:
        raise StageError(f"the model's lengths {low}..{high} make no TensorRT profile")
    profiles = {}
    for padded in sequence.padded:
        shape = list(shapes[padded.name])
        fixed = [d for i, d in enumerate(shape) if i not in (0, padded.axis)]
        if any(d < 1 for d in fixed):
            raise StageError(
                f"input {padded.name} {shape} has a dynamic dim besides the batch and its "
                f"sequence axis {padded.axis}; TensorRT's profile needs it fixed"
            )

        def at(batch: int, length: int, shape: list[int] = shape, axis: int = padded.axis):
            dims = [batch, *shape[1:]]
            dims[axis] = length
            return tuple(dims)

        profiles[padded.name] = Profile(
            at(params.min_batch, low), at(params.opt_batch, opt), at(params.max_batch, high)
        )
    return profiles


def major_version(version: str) -> int:
    match = re.match(r"(\d+)\.", str(version))
    if match is None:
        raise StageError(f"cannot read TensorRT's version from {version!r}")
    return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    precision: str  # what the engine computes in
    variant: str  # which exported ONNX to build from
    flags: tuple[str, ...]  # trt.BuilderFlag names to set
    strongly_typed: bool  # types come from the ONNX, not from flags
    accepts: tuple[str, ...]  # ONNX precisions this build can start from


def plan_build(major: int, precision: str, typed_fp16: bool = False) -> BuildPlan:
    """How to get ``precision`` out of TensorRT ``major``.

    10.x: weak typing; fp16 is the fp32 ONNX plus BuilderFlag.FP16 (TensorRT picks per
    layer), int8 needs the Q/DQ ONNX plus BuilderFlag.INT8 (we never use the deprecated
    implicit calibrators). 11.x removed those flags: the network is strongly typed, so the
    ONNX must already be in the precision (fp16 variant, Q/DQ int8 variant).
    ``typed_fp16`` (see ``typed_fp16``): fp16 on 10.x too comes from the fp16 variant in
    a strongly typed network, as on 11.x.
    """
    if major < 10:
        raise StageError(f"TensorRT {major}.x is not supported; install TensorRT 10 or 11")
    if major >= 11 or (typed_fp16 and precision == "fp16"):
        return BuildPlan(precision, precision, (), True, (precision,))
    if precision == "fp16":
        return BuildPlan("fp16", "fp32", ("FP16",), False, ("fp32", "fp16"))
    if precision == "int8":
        return BuildPlan("int8", "int8", ("INT8",), False, ("int8",))
    return BuildPlan("fp32", "fp32", (), False, ("fp32",))


def typed_fp16(contract: ModelContract) -> bool:
    """Whether an fp16 engine must keep the fp16 variant's fp32 ends (quantize.float_ends).

    With BuilderFlag.FP16 TensorRT 10 may run any layer in fp16, and a tabular model's raw
    inputs (an income of 80 000) or a regressor's prediction in target units (a price of
    150 000) overflow fp16's 65 504. A strongly typed network built from the fp16 variant
    runs those ends in fp32, as the ONNX says.
    """
    return contract.tabular is not None or contract.task == REGRESSION


def network_flags(trt: Any, plan: BuildPlan) -> int:
    """``create_network``'s flags: 0 is an explicit-batch, weakly typed network on 10.x;
    a strongly typed plan on 10.x asks for STRONGLY_TYPED (11.x is strongly typed
    regardless and deprecates the flag, so it is left out there)."""
    if not plan.strongly_typed or major_version(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def check_source(plan: BuildPlan, onnx_precision: str, onnx_path: Path, major: int) -> None:
    """The ONNX handed to the builder must be one this plan can start from."""
    if onnx_precision in plan.accepts:
        return
    suffix = "" if plan.variant == "fp32" else f".{plan.variant}"
    raise StageError(
        f"{onnx_path.name} is an {onnx_precision} model, but a {plan.precision} engine on "
        f"TensorRT {major}.x is built from the {plan.variant} export: pass "
        f"model{suffix}.onnx (export.variants must include {plan.variant})"
    )


SEQUENCE_INT8_FIX = "export with export.sequence_int8=static for a Q/DQ int8 model"
# pipeline/export.py's TABULAR_INT8: a tabular model's int8 variant is always dynamic.
TABULAR_INT8_FIX = "a tabular model's int8 variant is dynamic; build engine.precision=fp16"


def int8_fix(contract: ModelContract) -> str:
    """What to do about a dynamically quantized int8 ONNX of this model."""
    return TABULAR_INT8_FIX if contract.tabular is not None else SEQUENCE_INT8_FIX


def check_int8_form(op_types: set[str], onnx_path: Path, fix: str = SEQUENCE_INT8_FIX) -> None:
    """TensorRT builds int8 from Q/DQ only; dynamic quantization's integer ops it cannot parse."""
    dynamic = sorted(op_types & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
    if dynamic:
        raise StageError(
            f"{onnx_path.name} is dynamically quantized ({', '.join(dynamic)}), which TensorRT "
            f"cannot build; {fix}"
        )


def check_options(params: EngineParams, compute_capability: str) -> None:
    """Options this GPU cannot honour, caught before a long build."""
    major = int(compute_capability.split(".")[0])
    if params.hardware_compatibility == "ampere_plus" and major < 8:
        raise StageError(
            "engine.hardware_compatibility=ampere_plus needs an Ampere or newer GPU "
            f"(compute 8.0+), this one is compute {compute_capability}"
        )


def timing_cache_file(
    directory: Path, gpu_name: str, compute_capability: str, version: str
) -> Path:
    """One cache per GPU model and TensorRT version: a cache from another never applies."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return Path(directory) / f"{gpu}-sm{compute_capability.replace('.', '')}-trt{version}.cache"


def make_sidecar(
    contract: ModelContract,
    plan: BuildPlan,
    params: EngineParams,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profile: Profile | Mapping[str, Profile],
    io: dict[str, list[dict[str, Any]]],
    onnx_file: str,
    onnx_sha256: str,
) -> dict[str, Any]:
    """Everything a server needs besides the plan (see serving/contract.py). ``profile``:
    an image model's one input's, or a sequence model's per input name."""
    metadata = dataclasses.replace(contract, precision=plan.precision).to_metadata()
    return {
        "format": "tensorrt",
        "metadata": metadata,
        "class_names": list(contract.class_names),
        "precision": plan.precision,
        "tensorrt_version": tensorrt_version,
        "tensorrt_major": major_version(tensorrt_version),
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.flags),
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "hardware_compatibility": params.hardware_compatibility,
        "version_compatible": params.version_compatible,
        "workspace_mib": params.workspace_mib,
        "profile": (
            {name: p.to_json() for name, p in profile.items()}
            if isinstance(profile, Mapping)
            else profile.to_json()
        ),
        **io,
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
    }


# Prerequisites


def require_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise StageError(TENSORRT_MISSING) from None
    return tensorrt


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str


def require_cuda_python() -> None:
    """The stage runs the plan through the server's runner, which moves memory with cuda-python."""
    try:
        cuda_runtime()
    except EngineError:
        raise StageError(
            "engine.target=tensorrt runs the built plan with cuda-python, which is not "
            "installed: `pip install cuda-python`, or set engine.target=onnxruntime"
        ) from None


def require_cuda_gpu() -> Gpu:
    """The current CUDA device, seen through torch (the pipeline's one GPU dependency)."""
    import torch

    if not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build "
            '(make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")'
            if torch.version.cuda is None
            else "no CUDA device is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )
        raise StageError(
            f"engine.target=tensorrt needs an NVIDIA CUDA GPU: {why}; "
            "or set engine.target=onnxruntime"
        )
    major, minor = torch.cuda.get_device_capability()
    return Gpu(torch.cuda.get_device_name(), f"{major}.{minor}")


# TensorRT calls (GPU hosts only)


def build_serialized(
    trt: Any,
    onnx_path: Path,
    plan: BuildPlan,
    profile: Profile | Mapping[str, Profile],
    params: EngineParams,
    cache_file: Path | None,
) -> tuple[bytes, dict[str, list[dict[str, Any]]]]:
    """Parse, configure and build; returns the plan bytes and the network's I/O specs."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise StageError(f"TensorRT cannot parse {onnx_path.name}: {(errors or ['?'])[0]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, params.workspace_mib << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    _set_compatibility(trt, config, params)
    profiles = profile if isinstance(profile, Mapping) else {network.get_input(0).name: profile}
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(trt_profile)
    _load_timing_cache(config, cache_file)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError(f"TensorRT could not build {onnx_path.name} (see its log above)")
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), network_io(network)


def _set_compatibility(trt: Any, config: Any, params: EngineParams) -> None:
    if params.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if params.hardware_compatibility == "none":
        return
    level = getattr(trt.HardwareCompatibilityLevel, params.hardware_compatibility.upper(), None)
    if level is None:
        raise StageError(
            f"TensorRT {trt.__version__} has no hardware compatibility level "
            f"{params.hardware_compatibility!r}; set engine.hardware_compatibility=none"
        )
    config.hardware_compatibility_level = level


def _load_timing_cache(config: Any, cache_file: Path | None) -> None:
    previous = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(previous)
    # A cache from another GPU or TensorRT is refused with ignore_mismatch=False; start afresh.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def network_io(network: Any) -> dict[str, list[dict[str, Any]]]:
    def spec(tensor: Any) -> dict[str, Any]:
        return {
            "name": tensor.name,
            "dtype": TRT_DATATYPES.get(tensor.dtype.name, tensor.dtype.name),
            "shape": [int(d) for d in tensor.shape],
        }

    return {
        "inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)],
    }
