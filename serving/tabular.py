"""Tabular models: JSON records in, the model's float32 [N, F] input out (``POST /v1/predict``
and ``/v1/classify``), and the answers' JSON.

A body is ``{"instances": [record, ...]}`` or ``{"instance": record}``; a record is an
object keyed by column name or a list of every column's value in the contract's order.
Numeric columns take JSON numbers; categorical ones strings (a number is converted as
``str()`` writes it), mapped to the category's code, or to UNSEEN_CODE for a value the
model never saw, which the graph one-hot encodes as all zeros. A missing column or null is
NaN when the contract says ``impute`` (the graph fills it); otherwise the request is refused,
since the model never saw one and its answer would be undefined.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from serving import classify
from serving.contract import (
    CATEGORICAL,
    PREDICTION_NAME,
    REGRESSION,
    ModelContract,
    Signature,
    TabularColumn,
    TabularPreprocessing,
)
from serving.protocol import ProtocolError

# The contract's code for a category the train split never had (pipeline.dataset's too).
UNSEEN_CODE = -1
# Larger magnitudes would reach the graph as inf: refused, like infer's FP32 check.
FLOAT32_MAX = float(np.finfo(np.float32).max)
BODY_SHAPES = '{"instances": [{"column": value, ...}, ...]} or {"instance": {...}}'


def _refuse_constant(name: str) -> None:
    raise ProtocolError(f"JSON has no {name}: send null for a missing value")


def records(body: bytes, max_rows: int) -> tuple[list[Any], bool]:
    """The records a body carries, and whether it sent a list ("instances")."""
    try:
        payload: Any = json.loads(body, parse_constant=_refuse_constant)
    except ProtocolError:  # a NaN or Infinity literal
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"malformed JSON in request: {exc}") from None
    if not isinstance(payload, dict) or [*payload] not in (["instance"], ["instances"]):
        raise ProtocolError(f"send {BODY_SHAPES}")
    if "instance" in payload:
        return [payload["instance"]], False
    items = payload["instances"]
    if not isinstance(items, list) or not items:
        raise ProtocolError("'instances' must be a non-empty list of records")
    if len(items) > max_rows:
        raise ProtocolError(
            f"'instances' has {len(items)} records; this server takes at most {max_rows}"
        )
    return items, True


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "null")


class TabularEncoder:
    """Records to the features tensor, by the contract's columns (ProtocolError, naming the
    record and the column, for anything the model cannot take)."""

    def __init__(self, tabular: TabularPreprocessing) -> None:
        self.preprocessing = tabular
        self.input_name = tabular.input_name
        self.columns = tabular.columns
        self.impute = tabular.impute
        self._names = {c.name for c in tabular.columns}
        self._codes = [
            {v: i for i, v in enumerate(c.categories)} if c.type == CATEGORICAL else None
            for c in tabular.columns
        ]

    def encode(self, items: list[Any], many: bool) -> np.ndarray:
        """float32 [len(items), F]; ``many``: the body sent "instances" (names the rows)."""
        features = np.empty((len(items), len(self.columns)), np.float32)
        for i, record in enumerate(items):
            features[i] = self._row(record, f"instances[{i}]" if many else "the instance")
        return features

    def _row(self, record: Any, where: str) -> list[float]:
        if isinstance(record, dict):
            values = self._in_order(record, where)
        elif isinstance(record, list):
            if len(record) != len(self.columns):
                raise ProtocolError(
                    f"{where} has {len(record)} values; the model takes {len(self.columns)}, "
                    f"in this order: {self._listed()}"
                )
            values = record
        else:
            raise ProtocolError(
                f"{where} must be an object keyed by column name or a list of "
                f"{len(self.columns)} values in column order, not {_json_type(record)}"
            )
        return [
            self._value(column, codes, value, where)
            for column, codes, value in zip(self.columns, self._codes, values, strict=True)
        ]

    def _listed(self) -> str:
        return ", ".join(c.name for c in self.columns)

    def _in_order(self, record: dict[str, Any], where: str) -> list[Any]:
        unknown = [key for key in record if key not in self._names]
        if unknown:
            said = ", ".join(repr(k) for k in unknown)
            noun = "column" if len(unknown) == 1 else "columns"
            raise ProtocolError(
                f"{where} has unknown {noun} {said}; the model's columns are {self._listed()}"
            )
        return [record.get(c.name) for c in self.columns]

    def _value(
        self, column: TabularColumn, codes: dict[str, int] | None, value: Any, where: str
    ) -> float:
        if value is None:
            if self.impute:
                return math.nan  # the graph fills it with the train split's median or mode
            raise ProtocolError(
                f"{where} lacks a value for column '{column.name}' (missing or null); this "
                "model was trained without missing values, so every column needs one"
            )
        if codes is not None:
            return float(_code(codes, value, column.name, where))
        return _number(value, column.name, where)


def _code(codes: dict[str, int], value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ProtocolError(
            f"{where} column '{name}' is categorical: send its value as a string, "
            f"not {_json_type(value)}"
        )
    return codes.get(value if isinstance(value, str) else str(value), UNSEEN_CODE)


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{where} column '{name}' must be a number, not {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not abs(number) <= FLOAT32_MAX:
        raise ProtocolError(f"{where} column '{name}' is {value}, beyond float32's range")
    return number


def predictions(outputs: dict[str, np.ndarray], contract: ModelContract) -> list[Any]:
    """/v1/predict's answer per row: a regressor's value, or a classifier's top class."""
    if contract.task == REGRESSION:
        return values(outputs)
    return [
        classify.top_k(row, contract.class_names, 1)[0] for row in classify.probabilities(outputs)
    ]


def values(outputs: dict[str, np.ndarray]) -> list[Any]:
    """A regressor's answers, a number per row (a list per row for several targets)."""
    rows = outputs[PREDICTION_NAME]
    # JSON has no NaN or inf: a value the model could not compute is null.
    answers = [
        [v if math.isfinite(v) else None for v in row]
        for row in rows.reshape(len(rows), -1).tolist()
    ]
    return [row[0] if len(row) == 1 else row for row in answers]


def encoder(contract: ModelContract | None, signature: Signature) -> TabularEncoder | None:
    """The records encoder of a tabular model whose one input is its features (so records
    alone can fill it); None for any other model."""
    tabular = None if contract is None else contract.tabular
    if tabular is None or [s.name for s in signature.inputs] != [tabular.input_name]:
        return None
    return TabularEncoder(tabular)
