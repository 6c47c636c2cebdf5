import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.dataset import CATEGORICAL, NUMERIC, Column, Meta
from pipeline.errors import StageError
from pipeline.models import (
    ModelSpec,
    Regressor,
    TabularModel,
    TabularPreprocess,
    build_module,
    network_output,
)

NAN = math.nan
COLUMNS = (
    Column("a", NUMERIC, mean=2.0, std=4.0, fill=1.0),
    Column("c", CATEGORICAL, categories=("x", "y", "z"), fill=2.0),
    Column("b", NUMERIC, mean=5.0, std=0.0),  # constant in train, no fill (refuse)
)


def meta(task: str = "classification", columns=COLUMNS) -> Meta:  # noqa: ANN001
    return Meta(
        class_names=("p", "q", "r") if task == "classification" else (),
        input_shape=(len(columns),),
        mean=(),
        std=(),
        split_sizes={},
        fingerprint="",
        source={},
        kind="tabular",
        task=task,
        columns=tuple(columns),
        target_mean=100.0 if task == "regression" else 0.0,
        target_std=10.0 if task == "regression" else 1.0,
    )


def spec(task: str = "classification", name: str = "mlp", **overrides) -> ModelSpec:
    outputs = 1 if task == "regression" else 3
    values = {"hidden": (16, 8), "batch_norm": True, "dropout": 0.1, "task": task}
    return ModelSpec(name, (len(COLUMNS),), outputs, kind="tabular", **{**values, **overrides})


def test_preprocess_standardises_one_hot_encodes_and_fills_in_column_order():
    pre = TabularPreprocess(COLUMNS)
    rows = torch.tensor(
        [
            [6.0, 0.0, 5.0],  # a = (6 - 2) / 4; c = x; b constant: centred only
            [NAN, NAN, 7.0],  # a and c missing: their fills (1.0 and code 2, z)
            [2.0, -1.0, 5.0],  # c unseen in train: all zeros
            [2.0, 3.0, 5.0],  # c beyond the categories: all zeros too
        ]
    )
    expected = torch.tensor(
        [
            [1.0, 1, 0, 0, 0.0],
            [-0.25, 0, 0, 1, 2.0],
            [0.0, 0, 0, 0, 0.0],
            [0.0, 0, 0, 0, 0.0],
        ]
    )
    assert pre.out_features == 5
    assert torch.equal(pre(rows), expected)


def test_without_fills_nan_stays_nan_and_a_missing_category_is_zeros():
    columns = [Column("a", NUMERIC, mean=0.0, std=1.0), Column("c", CATEGORICAL, ("x", "y"))]
    pre = TabularPreprocess(columns)
    out = pre(torch.tensor([[NAN, NAN]]))
    assert torch.isnan(out[0, 0]) and torch.equal(out[0, 1:], torch.zeros(2))
    graph = torch.export.export(pre, (torch.zeros(2, 2),)).graph_module.code
    assert "isnan" not in graph  # nothing to fill: no IsNaN in what is exported


def test_a_column_of_unknown_type_is_a_clear_error():
    with pytest.raises(StageError, match="column 'd': type must be numeric or categorical"):
        TabularPreprocess([Column("d", "date")])
    with pytest.raises(StageError, match="column 'e'.* with 0 categories"):
        TabularPreprocess([Column("e", CATEGORICAL)])


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_layers_and_parameter_count(batch_norm):
    model = build_module(spec(batch_norm=batch_norm), meta())
    assert isinstance(model, TabularModel)
    layers = [type(m).__name__ for m in model.network]
    block = ["Linear", "BatchNorm1d", "ReLU", "Dropout"] if batch_norm else ["Linear", "ReLU"]
    block = block if batch_norm else [*block, "Dropout"]
    assert layers == [*block, *block, "Linear"]
    # 5 encoded inputs -> 16 -> 8 -> 3; with batch norm no bias before it, 2 per unit in it
    if batch_norm:
        assert count(model) == 5 * 16 + 2 * 16 + 16 * 8 + 2 * 8 + 8 * 3 + 3
    else:
        assert count(model) == 5 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    assert model.eval()(torch.zeros(7, 3)).shape == (7, 3)


def test_no_hidden_layers_is_a_linear_model_and_bad_sizes_are_errors():
    model = build_module(spec(hidden=()), meta())
    assert [type(m).__name__ for m in model.network] == ["Linear"]
    with pytest.raises(StageError, match=r"model.hidden sizes must be at least 1, got \[4, 0\]"):
        build_module(spec(hidden=(4, 0)), meta())
    with pytest.raises(StageError, match=r"model.dropout must be in \[0, 1\)"):
        build_module(spec(dropout=1.0), meta())


def test_regression_unit_outputs_target_units_as_a_vector():
    torch.manual_seed(0)
    model = build_module(spec("regression"), meta("regression")).eval()
    assert isinstance(model, Regressor)
    rows = torch.randn(6, 3)
    standardised = network_output(model, rows)
    assert standardised.shape == (6, 1)
    prediction = model(rows)
    assert prediction.shape == (6,) and prediction.dtype == torch.float32
    assert torch.allclose(prediction, standardised[:, 0] * 10.0 + 100.0)


@pytest.mark.parametrize("name", ["gru", "seed_cnn"])
def test_other_models_on_tabular_data_are_one_clear_error(name):
    with pytest.raises(StageError, match=f"model '{name}' is a.* but the prepared data is tabular"):
        build_module(spec(name=name), meta())
    with pytest.raises(StageError, match="set model.name to one of mlp"):
        build_module(spec(name=name), meta())


def test_image_mlp_specs_from_before_batch_norm_rebuild_their_layout():
    old = {"name": "mlp", "input_shape": [1, 4, 4], "num_classes": 3, "hidden": [8], "dropout": 0.1}
    restored = ModelSpec.from_dict(old)
    assert (restored.batch_norm, restored.dropout, restored.task) == (False, 0.0, "classification")
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    image_meta = Meta(("a", "b", "c"), (1, 4, 4), (0.5,), (0.2,), {}, "", {})
    model = build_module(restored, image_meta)
    model.network.load_state_dict({f"net.{k}": v for k, v in net.state_dict().items()})
    new = spec(options={"k": [1]})
    assert ModelSpec.from_dict(new.to_dict()) == new


class Named(torch.nn.Module):
    """The unit with its input named, as the exporter's wrapper gives it."""

    def __init__(self, unit: torch.nn.Module) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.unit(features)


def test_tabular_unit_exports_with_dynamo_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = build_module(spec("regression"), meta("regression")).eval()
    example = torch.tensor([[1.0, 0.0, 5.0], [NAN, 2.0, 5.0]])
    program = torch.onnx.export(
        Named(model).eval(),
        (example,),
        dynamo=True,
        opset_version=18,
        input_names=["features"],
        output_names=["prediction"],
        dynamic_shapes={"features": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    proto = program.model_proto
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"If", "Loop", "Scan"}, "no data-dependent control flow"
    string = onnx.TensorProto.STRING
    assert all(v.type.tensor_type.elem_type != string for v in proto.graph.input)
    assert all(t.data_type != string for t in proto.graph.initializer)
    path = tmp_path / "tabular.onnx"
    onnx.save(proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64):
        rows = rng.normal(size=(batch, 3)).astype(np.float32)
        rows[:, 1] = rng.integers(-1, 4, batch)  # codes, unseen and out of range included
        rows[::3, 0] = np.nan
        (got,) = session.run(None, {"features": rows})
        with torch.no_grad():
            want = model(torch.from_numpy(rows)).numpy()
        assert got.shape == (batch,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
