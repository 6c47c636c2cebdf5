from pathlib import Path

import pytest
import yaml

from pipeline.errors import StageError
from pipeline.params import (
    DataParams,
    EngineParams,
    EvaluateParams,
    ExportParams,
    ModelParams,
    TrainParams,
    as_dict,
    load_params,
)
from tests.conftest import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_when_section_missing(tmp_path):
    assert load_params("train", TrainParams, write(tmp_path, "data: {}\n")) == TrainParams()


def test_values_are_typed_and_frozen(tmp_path):
    params = load_params(
        "model", ModelParams, write(tmp_path, "model:\n  name: mlp\n  hidden: [64, 32]\n")
    )
    assert params == ModelParams(name="mlp", hidden=(64, 32))
    with pytest.raises(AttributeError):
        params.name = "resnet"  # type: ignore[misc]


def test_int_is_accepted_for_float(tmp_path):
    assert load_params("train", TrainParams, write(tmp_path, "train:\n  lr: 1\n")).lr == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epoch: 3\n", "unknown key train.epoch"),
        ("train:\n  epochs: three\n", "train.epochs must be int, got 'three'"),
        ("train:\n  epochs: true\n", "train.epochs must be int, got True"),
        ("train:\n  lr: fast\n", "train.lr must be float"),
        ("train:\n  optimizer: lion\n", "train.optimizer must be one of 'adam', 'adamw', 'sgd'"),
        ("train: [1, 2]\n", "train must be a mapping"),
    ],
)
def test_bad_train_params_name_the_key(tmp_path, text, message):
    with pytest.raises(StageError, match=message):
        load_params("train", TrainParams, write(tmp_path, text))


def test_unknown_source_and_model_name(tmp_path):
    with pytest.raises(StageError, match=r"data.source must be one of .*got 'mnist'"):
        load_params("data", DataParams, write(tmp_path, "data:\n  source: mnist\n"))
    with pytest.raises(StageError, match=r"model.name must be one of .*got 'vit'"):
        load_params("model", ModelParams, write(tmp_path, "model:\n  name: vit\n"))


def test_list_items_are_checked(tmp_path):
    with pytest.raises(StageError, match=r"model.hidden\[1\] must be int"):
        load_params("model", ModelParams, write(tmp_path, "model:\n  hidden: [64, x]\n"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(StageError, match="not found"):
        load_params("data", DataParams, tmp_path / "absent.yaml")
    with pytest.raises(StageError, match="not valid YAML"):
        load_params("data", DataParams, write(tmp_path, "data: [unclosed\n"))


def test_repository_params_load():
    root = Path(__file__).resolve().parents[2]
    assert load_params("data", DataParams, root / "params.yaml").source == "digits"
    assert load_params("model", ModelParams, root / "params.yaml").name == "seed_cnn"
    load_params("train", TrainParams, root / "params.yaml")
    # Off unless a model needs it: the engine then computes what the parity-checked export does.
    assert load_params("engine", EngineParams, root / "params.yaml").flush_denormals is False
    assert EngineParams().flush_denormals is False


SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "engine": EngineParams,
}


def test_params_yaml_repeats_the_code_defaults_exactly():
    """A stage run without params.yaml (`tensorferry train`) must do what `dvc repro` does."""
    document = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(document) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert document[section] == as_dict(cls()), f"params.yaml {section} vs {cls.__name__}"


def readme_defaults(section: str) -> dict[str, object]:
    """The `key | default | meaning` rows of the README's table for ``section``."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split(f"### `{section}` (", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    defaults: dict[str, object] = {}
    for keys, default, *_ in rows:
        names = [k.strip("| `") for k in keys.split(" / ")]
        values = default.split(" / ") if len(names) > 1 else [default]
        for name, value in zip(names, values, strict=True):
            defaults[name] = _scalar(value.strip("` "))
    return defaults


def _scalar(text: str) -> object:
    value = yaml.safe_load(text)
    try:  # YAML 1.1 reads 1e-4 as a string
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_readme_params_reference_shows_the_code_defaults(section):
    expected = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in as_dict(SECTIONS[section]()).items()
    }
    assert readme_defaults(section) == expected
