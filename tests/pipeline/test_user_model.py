import sys
import textwrap

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.dataset import load_meta, load_split
from pipeline.errors import StageError
from pipeline.evaluate import evaluate
from pipeline.params import EvaluateParams, ModelParams, TrainParams
from pipeline.train import train
from pipeline.user_model import check_output
from tests.pipeline.tabular_prepared import write_tabular_prepared

PACKAGE = "tf_test_user_models"  # unique: imported modules stay in sys.modules
NETS = '''
"""Factories as a user writes them: factory(meta, options) -> nn.Module."""
from torch import nn

from pipeline.models import TabularPreprocess


def regressor(meta, options):
    """The standardised target as [N, 1]."""
    pre = TabularPreprocess(meta.columns)
    hidden = options["hidden"]
    return nn.Sequential(pre, nn.Linear(pre.out_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class Vector(nn.Module):
    """The standardised target as [N]."""

    def __init__(self, meta):
        super().__init__()
        self.pre = TabularPreprocess(meta.columns)
        self.linear = nn.Linear(self.pre.out_features, 1)

    def forward(self, features):
        return self.linear(self.pre(features))[:, 0]


def vector(meta, options):
    return Vector(meta)


def classifier(meta, options):
    pre = TabularPreprocess(meta.columns)
    return nn.Sequential(pre, nn.Linear(pre.out_features, len(meta.class_names)))


def too_wide(meta, options):
    pre = TabularPreprocess(meta.columns)
    return nn.Sequential(pre, nn.Linear(pre.out_features, 5))


def not_a_module(meta, options):
    return "a string"


def raises(meta, options):
    raise ValueError("options need a 'depth'\\nsecond line the error line leaves out")
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_code")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("")
    (root / PACKAGE / "nets.py").write_text(textwrap.dedent(NETS))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        yield f"{PACKAGE}.nets"
    for name in (PACKAGE, f"{PACKAGE}.nets"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    return {
        "regression": write_tabular_prepared(root / "regression", "regression", impute=True),
        "classification": write_tabular_prepared(root / "classification", "classification"),
    }


QUICK = TrainParams(epochs=25, batch_size=32, lr=0.02)


def fit(tmp_path, data_dir, name, options=None, tag="run"):  # noqa: ANN001
    out = tmp_path / tag
    model = ModelParams(name=name, options=options or {})
    history = train(model, QUICK, data_dir, out / "checkpoint.pt", out / "live")
    return history, out


@pytest.fixture(scope="module")
def trained_regressor(tmp_path_factory, package, prepared):
    out = tmp_path_factory.mktemp("regressor")
    history, _ = fit(out, prepared["regression"], f"{package}:regressor", {"hidden": 16})
    return history, out / "run"


def test_a_user_regressor_trains_evaluates_and_rebuilds_without_the_data(
    tmp_path, trained_regressor, prepared, package
):
    history, out = trained_regressor
    meta = load_meta(prepared["regression"])
    assert history[-1].val_rmse < 0.5 * meta.target_std
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.spec.name == f"{package}:regressor"
    assert checkpoint.spec.options == {"hidden": 16} and checkpoint.meta == meta
    model = checkpoint.build()  # from the checkpoint alone: the factory gets its Meta
    test = load_split("test", prepared["regression"], meta)
    with torch.no_grad():
        predicted = model(torch.from_numpy(test.x))
    assert predicted.shape == (60,)  # un-standardised: target units, around the mean
    assert abs(float(predicted.mean()) - meta.target_mean) < meta.target_std
    metrics = evaluate(
        EvaluateParams(), prepared["regression"], out / "checkpoint.pt", out / "live", tmp_path
    )
    assert metrics["r2"] > 0.5 and metrics["test_size"] == 60


def test_a_factory_that_is_gone_at_evaluate_time_is_one_error(
    tmp_path, trained_regressor, prepared, monkeypatch
):
    _, out = trained_regressor
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "user_code" not in p])
    for name in (PACKAGE, f"{PACKAGE}.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    checkpoint = out / "checkpoint.pt"
    with pytest.raises(StageError) as caught:
        evaluate(EvaluateParams(), prepared["regression"], checkpoint, out / "live", tmp_path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {checkpoint} was trained with a user model")
    assert f"'{PACKAGE}.nets:regressor'" in message
    assert f"ModuleNotFoundError: No module named '{PACKAGE}'" in message
    assert "\n" not in message and not (tmp_path / "metrics.json").exists()


def test_a_vector_output_and_a_classifier_train(tmp_path, package, prepared):
    history, _ = fit(tmp_path, prepared["regression"], f"{package}:vector", tag="vector")
    assert history[-1].val_rmse is not None
    history, out = fit(tmp_path, prepared["classification"], f"{package}:classifier")
    assert history[-1].val_acc >= 0.7
    assert load_checkpoint(out / "checkpoint.pt").build()(torch.zeros(2, 3)).shape == (2, 3)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("not_a_module", r":not_a_module': the factory returned a str, not a torch.nn.Module$"),
        ("raises", r":raises': the factory raised ValueError: options need a 'depth'$"),
        (
            "too_wide",
            r":too_wide': the factory returned a module whose output is \[32, 5\] for a batch "
            r"of 32 rows, expected \[N, 3\] \(N rows, 3 classes\)$",
        ),
        ("absent", r"model.name '.*:absent': module .* has no attribute 'absent'$"),
    ],
)
def test_a_broken_factory_is_one_clear_error(tmp_path, package, prepared, factory, message):
    with pytest.raises(StageError, match=message):
        fit(tmp_path, prepared["classification"], f"{package}:{factory}")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_output_shapes_a_regression_factory_may_return(prepared):
    meta = load_meta(prepared["regression"])
    check_output(torch.zeros(4), 4, meta, "p.m:f")
    check_output(torch.zeros(4, 1), 4, meta, "p.m:f")
    for wrong in (torch.zeros(4, 2), torch.zeros(3), (torch.zeros(4),)):
        with pytest.raises(StageError, match=r"expected \[N\] or \[N, 1\] \(the standardised"):
            check_output(wrong, 4, meta, "p.m:f")
