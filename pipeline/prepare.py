"""prepare stage: raw source -> seeded train/val/test arrays + meta.json.

Classification splits are stratified by class, regression splits random. Images become
uint8 arrays; texts are tokenized, series padded and tabular columns coded only after the
split, so nothing learnt from the data (a tokenizer, a column's categories, mean or fill)
has seen validation or test rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pipeline.artifacts import atomic_path, write_json
from pipeline.dataset import DEFAULT_DIR, SPLITS, Meta, Split, save_split
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.params import DataParams, as_dict, is_import_path, load_with_overrides
from pipeline.series_data import encode_series, load_series
from pipeline.sources import Encoded, RawData, load_source
from pipeline.tabular_data import encode_tabular, load_tabular
from pipeline.text_data import encode_text, load_text
from pipeline.user_data import load_user

Pair = tuple[np.ndarray, np.ndarray]  # (x, y)
Rows = dict[str, Pair]  # split -> (x, y) before encoding


def prepare(params: DataParams, out: Path = DEFAULT_DIR) -> Meta:
    """Load the configured source, split it, encode it and write ``out`` atomically."""
    with step("load source"):
        raw = load_raw(params)
        _check_task(raw, params)
    with step("split"):
        splits = split_data(raw, params)
        splits = {n: _cap_per_class(x, y, params.max_per_class) for n, (x, y) in splits.items()}
        if raw.task == "classification":
            _check_every_class_present(splits, raw.class_names)
    encoders = {
        "image": _encode_images,
        "text": encode_text,
        "series": encode_series,
        "tabular": functools.partial(encode_tabular, columns=raw.columns),
    }
    with step("encode"):
        encoded = encoders[raw.kind](splits, params)
        meta = _describe(encoded, raw, params)
    with step("write"), atomic_path(Path(out)) as tmp:
        tmp.mkdir()
        for name, split in encoded.splits.items():
            save_split(tmp / f"{name}.npz", split)
        for name, text in encoded.files.items():
            (tmp / name).write_text(text)
        write_json(tmp / "meta.json", meta.to_json())
    return meta


def load_raw(params: DataParams) -> RawData:
    """The source ``data.source`` names: a built-in one, or a user's loader."""
    if is_import_path(params.source):
        return load_user(params)
    loaders = {"text": load_text, "series": load_series, "tabular": load_tabular}
    return loaders.get(params.source, load_source)(params)


def _check_task(raw: RawData, params: DataParams) -> None:
    if params.task is not None and params.task != raw.task:
        what = params.dataset if params.source == "tabular" else params.source
        raise StageError(
            f"data.task is {params.task}, but {what} is a {raw.task} data set; "
            f"set data.task: {raw.task} or null"
        )
    if raw.task == "regression" and params.max_per_class is not None:
        raise StageError(
            "data.max_per_class caps examples per class, and a regression target has no "
            "classes; set it to null (use a smaller data set for quick runs)"
        )


def split_data(raw: RawData, params: DataParams) -> Rows:
    """Use the source's own splits where it has them; carve the rest out of train (or of
    the one pool, ``all``), stratified by class for classification."""
    splits = dict(raw.splits)
    if "all" in splits:
        splits["train"] = splits.pop("all")
    stratify = raw.task == "classification"
    if "test" not in splits:
        splits["train"], splits["test"] = _carve(
            splits["train"], params.test_fraction, params.seed, stratify
        )
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(
            splits["train"], params.val_fraction, params.seed, stratify
        )
    return {name: splits[name] for name in SPLITS}


def _carve(data: Pair, fraction: float, seed: int, stratify: bool) -> tuple[Pair, Pair]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise StageError(f"split fractions must be between 0 and 1, got {fraction}")
    x, y = data
    try:
        x_keep, x_held, y_keep, y_held = train_test_split(
            x, y, test_size=fraction, stratify=y if stratify else None, random_state=seed
        )
    except ValueError as exc:
        how = " stratified by class" if stratify else ""
        raise StageError(f"cannot split {len(y)} examples{how}: {exc}") from None
    return (x_keep, y_keep), (x_held, y_held)


def _cap_per_class(x: np.ndarray, y: np.ndarray, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    if cap is None:
        return x, y
    keep = np.concatenate([np.flatnonzero(y == label)[:cap] for label in np.unique(y)])
    keep.sort()
    return x[keep], y[keep]


def _check_every_class_present(splits: Rows, class_names: tuple[str, ...]) -> None:
    for name, (_, y) in splits.items():
        present = set(np.unique(y).tolist())
        for label, class_name in enumerate(class_names):
            if label not in present:
                raise StageError(f"class {class_name!r} is in train but not in {name}")


def _encode_images(splits: Rows, _: DataParams) -> Encoded:
    scaled = splits["train"][0].astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)  # a constant channel must not divide by 0
    return Encoded(
        {name: Split(x, y) for name, (x, y) in splits.items()},
        mean=tuple(round(float(m), 6) for m in mean),
        std=tuple(round(float(s), 6) for s in std),
    )


def _describe(encoded: Encoded, raw: RawData, params: DataParams) -> Meta:
    splits = encoded.splits
    target_mean, target_std = _target_stats(splits["train"].y, raw.task)
    return Meta(
        class_names=raw.class_names,
        input_shape=tuple(int(d) for d in splits["train"].x.shape[1:]),
        mean=encoded.mean,
        std=encoded.std,
        split_sizes={name: int(len(splits[name].y)) for name in SPLITS},
        fingerprint=_fingerprint(encoded, raw),
        source=as_dict(params),
        conversions=raw.conversions + encoded.conversions,
        kind=raw.kind,
        vocab_size=encoded.vocab_size,
        length_stats=_length_stats(splits),
        task=raw.task,
        columns=encoded.columns,
        target_mean=target_mean,
        target_std=target_std,
    )


def _fingerprint(encoded: Encoded, raw: RawData) -> str:
    regression = raw.task == "regression"
    # Classification hashes x and y only, as it always has: its fingerprints stay comparable.
    digest = hashlib.sha256(repr(raw.class_names).encode())
    for name in SPLITS:
        split = encoded.splits[name]
        digest.update(np.ascontiguousarray(split.x).tobytes())
        y_dtype = np.float32 if regression else np.int64
        digest.update(np.ascontiguousarray(split.y, dtype=y_dtype).tobytes())
        if split.lengths is not None:
            digest.update(np.ascontiguousarray(split.lengths, dtype=np.int64).tobytes())
    if regression or encoded.columns:
        # What a code or column means lives in meta.json, not in x: hash it too.
        described = {"task": raw.task, "columns": [c.to_json() for c in encoded.columns]}
        digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def _target_stats(y: np.ndarray, task: str) -> tuple[float, float]:
    """Regression: the train split's target mean and population std (1 would hide a
    constant target, which nothing can learn from)."""
    if task != "regression":
        return 0.0, 1.0
    values = y.astype(np.float64)
    if values.min() == values.max():
        raise StageError(
            f"every train-split target is {values[0]:g}; regression needs targets that vary"
        )
    return float(values.mean()), float(values.std())


def _length_stats(splits: dict[str, Split]) -> dict[str, int]:
    if splits["train"].lengths is None:
        return {}
    lengths = np.concatenate([splits[name].lengths for name in SPLITS])  # type: ignore[misc]
    return {
        "min": int(lengths.min()),
        "median": int(np.median(lengths)),
        "max": int(lengths.max()),
    }


@exit_on_stage_error
def command(
    params_file: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="params.yaml to read the `data` section from (default: ./params.yaml when "
            "it exists, else the built-in defaults, which are params.yaml's).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for {train,val,test}.npz and meta.json.")
    ] = DEFAULT_DIR,
) -> None:
    """Prepare the data set: load the source, split it, write its arrays and meta.json."""
    params = load_with_overrides("data", DataParams, params_file)
    meta = prepare(params, out)
    for conversion in meta.conversions:
        typer.echo(f"{params.source}: {conversion}")
    sizes = ", ".join(f"{k} {v}" for k, v in meta.split_sizes.items())
    what = f"{len(meta.class_names)} classes"
    if meta.is_regression:
        what = f"a regression target (train mean {meta.target_mean:.4g}, std {meta.target_std:.4g})"
    typer.echo(f"prepared {what}, shape {meta.input_shape}: {sizes}")
    if meta.length_stats:
        stats = ", ".join(f"{k} {v}" for k, v in meta.length_stats.items())
        typer.echo(f"{meta.kind} lengths: {stats}")


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
