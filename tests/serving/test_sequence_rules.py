"""serving.sequence below the server: batch groups, length rules, the pad-merge refusal,
and raw-text bodies."""

from __future__ import annotations

import numpy as np
import pytest

from serving.contract import Signature, TensorSpec
from serving.protocol import ProtocolError
from serving.sequence import sequence_inputs, texts
from tests.serving.sequence_models import series_contract, text_contract, tokenizer_json

TEXT = Signature.from_graph(
    (TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))),
    (TensorSpec("logits", "FP32", (-1, 3)),),
)
SERIES = Signature.from_graph(
    (TensorSpec("series", "FP32", (-1, 2, -1)), TensorSpec("mask", "INT64", (-1, -1))),
    (TensorSpec("logits", "FP32", (-1, 2)),),
)


@pytest.fixture(scope="module")
def text():
    return text_contract(tokenizer_json())


def test_pad_groups_ignore_the_padded_axis_but_not_the_others(text) -> None:
    rules = sequence_inputs(TEXT, text, "pad", vocab=100)
    assert rules is not None and rules.pad
    short, long = np.zeros((1, 3), np.int64), np.zeros((2, 9), np.int64)
    assert rules.group([short, short]) == rules.group([long, long])
    series = sequence_inputs(SERIES, series_contract(2), "pad")
    assert series is not None and series.padding == {"series": (2, 0.0), "mask": (1, 0.0)}
    two, three = np.zeros((1, 2, 5), np.float32), np.zeros((1, 3, 5), np.float32)
    mask = np.zeros((1, 5), np.int64)
    assert series.group([two, mask]) == series.group([np.zeros((4, 2, 8)), np.zeros((4, 8))])
    assert series.group([two, mask]) != series.group([three, mask])  # channels must match


def test_equal_groups_by_every_shape(text) -> None:
    rules = sequence_inputs(TEXT, text, "equal", vocab=100)
    assert rules is not None and not rules.pad
    short, long = np.zeros((1, 3), np.int64), np.zeros((1, 9), np.int64)
    assert rules.group([short, short]) != rules.group([long, long])


def test_an_output_with_a_dynamic_dim_refuses_pad_merge(text) -> None:
    per_step = Signature.from_graph(TEXT.inputs, (TensorSpec("tags", "FP32", (-1, -1, 4)),))
    rules = sequence_inputs(per_step, text, "pad", vocab=100)
    assert rules is not None and not rules.pad


def test_models_without_sequence_preprocessing_have_no_rules() -> None:
    assert sequence_inputs(TEXT, None, "pad") is None


def test_lengths_and_ids_are_checked(text) -> None:
    rules = sequence_inputs(TEXT, text, "pad", vocab=100)
    assert rules is not None
    ones = np.ones((1, 4), np.int64)
    rules.check({"input_ids": ones, "attention_mask": ones})
    with pytest.raises(ProtocolError, match="share one length"):
        rules.check({"input_ids": ones, "attention_mask": np.ones((1, 5), np.int64)})
    with pytest.raises(ProtocolError, match="outside the model's 1 to 32"):
        long = np.ones((1, 33), np.int64)
        rules.check({"input_ids": long, "attention_mask": long})
    with pytest.raises(ProtocolError, match="vocabulary of 100"):
        rules.check_values({"input_ids": ones * 100, "attention_mask": ones})


def test_text_bodies() -> None:
    assert texts("héllo".encode(), "text/plain", 4) == (["héllo"], False)
    assert texts(b'{"texts": ["a", "b"]}', "application/json", 4) == (["a", "b"], True)
    with pytest.raises(ProtocolError, match="at most 1"):
        texts(b'{"texts": ["a", "b"]}', "application/json; charset=utf-8", 1)


def test_bucket_groups_merge_lengths_within_a_power_of_two_class(text) -> None:
    rules = sequence_inputs(TEXT, text, "bucket", vocab=100)
    assert rules is not None and rules.pad and rules.buckets

    def group(length: int) -> tuple:
        ids = np.zeros((1, length), np.int64)
        return rules.group([ids, ids])

    assert group(5) == group(8) != group(9) == group(16) != group(17)
    assert group(1) != group(2) != group(3) == group(4)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "bucket"),
        (["--sequence-batching", "pad"], {}, "pad"),
        ([], {"TENSORFERRY_SEQUENCE_BATCHING": "equal"}, "equal"),
    ],
    ids=["default", "flag", "env"],
)
def test_sequence_batching_from_flag_or_env_var(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict, expected: str
) -> None:
    from typer.main import get_command

    from serving.cli import app

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    context = get_command(app).make_context("serve", ["--engine", "m.onnx", *args])
    assert context.params["sequence_batching"].value == expected


def test_an_unknown_policy_is_refused() -> None:
    from pathlib import Path

    from serving.config import ServerConfig

    with pytest.raises(ValueError, match="sequence_batching must be one of pad, bucket, equal"):
        ServerConfig(engine=Path("m.onnx"), sequence_batching="longest")
