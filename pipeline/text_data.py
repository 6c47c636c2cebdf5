"""Text for the prepare stage: read labelled texts, then tokenize them once split.

Sources (``data.path``): a ``.tsv``/``.csv`` file with a header row or a ``.jsonl`` file
(one object per line), read as one pool; or a folder ``ROOT/[<split>/]<class>/*.txt``
laid out like imagefolder. The BPE tokenizer is trained on the train split only, so the
validation and test splits are tokenized as unseen text is at serving time.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.dataset import PAD_ID, TOKENIZER_FILE, Split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.sources import Encoded, RawData, folder_class_names

PAD, UNK = "[PAD]", "[UNK]"  # trained as special tokens in this order: ids 0 and 1
DELIMITERS = {".tsv": "\t", ".csv": ","}


def load_text(params: DataParams) -> RawData:
    _check_params(params)
    if not params.path:
        raise StageError("data.path must name a .tsv, .csv or .jsonl file or a folder for text")
    path = Path(params.path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise StageError(f"data.path {path} not found")
    if path.suffix.lower() not in (*DELIMITERS, ".jsonl"):
        raise StageError(f"data.path {path}: text files must end in .tsv, .csv or .jsonl")
    texts, labels = [], []
    for where, text, label in _read_rows(path, params):
        if not text:
            raise StageError(f"{where}: empty text in {' + '.join(params.text_columns)}")
        if not label:
            raise StageError(f"{where}: empty label in {params.label_column}")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise StageError(f"{path} has no rows")
    class_names = tuple(sorted(set(labels)))
    y = np.asarray([class_names.index(label) for label in labels], dtype=np.int64)
    return RawData(class_names, {"all": (_objects(texts), y)}, kind="text")


def _check_params(params: DataParams) -> None:
    if not params.text_columns:
        raise StageError("data.text_columns must name at least one column")
    if params.vocab_size < 3:
        raise StageError(
            f"data.vocab_size must be at least 3 ([PAD], [UNK], one more), got {params.vocab_size}"
        )
    if params.max_length < 1:
        raise StageError(f"data.max_length must be at least 1, got {params.max_length}")


def _read_rows(path: Path, params: DataParams) -> Iterator[tuple[str, str, str]]:
    """(``file:line``, joined stripped text, stripped label) per row."""
    columns = (*params.text_columns, params.label_column)
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _delimited_rows(path)
    try:
        for where, row in rows:
            missing = [c for c in columns if c not in row]
            if missing:
                known = ", ".join(str(k) for k in row)
                raise StageError(f"{where}: no column {missing[0]!r} (columns: {known})")
            text = " ".join(_field(row[c]) for c in params.text_columns).strip()
            yield where, text, _field(row[params.label_column])
    except UnicodeDecodeError as exc:
        raise StageError(f"{path} is not UTF-8 text: {exc}") from None


def _field(value: object) -> str:
    # A JSON null is no text, not the text "None"; a number label is its digits.
    return "" if value is None else str(value).strip()


def _delimited_rows(path: Path) -> Iterator[tuple[str, dict]]:
    delimiter = DELIMITERS[path.suffix.lower()]
    # A .tsv field is never quoted (IANA text/tab-separated-values): an SMS that opens
    # with a quote mark is text, not the start of a quoted field.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # utf-8-sig: spreadsheet exports open with a byte-order mark, which would otherwise
    # become part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise StageError(f"{path} is empty (expected a header row)")
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if fields and len(fields) != len(header):
                raise StageError(f"{where}: {len(fields)} fields, the header has {len(header)}")
            if fields:
                yield where, dict(zip(header, fields, strict=True))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise StageError(f"{where}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise StageError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _load_folder(root: Path) -> RawData:
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and "test" not in split_dirs:
        raise StageError(f"{root} has a train/ folder but no test/ folder")
    split_dirs = split_dirs or {"all": root}
    class_names = folder_class_names(split_dirs)
    splits = {}
    for split, folder in split_dirs.items():
        texts, labels = [], []
        for label, name in enumerate(class_names):
            files = sorted((folder / name).glob("*.txt"))
            if not files:
                raise StageError(f"class folder {folder / name} has no .txt files")
            texts += [_read_text_file(f) for f in files]
            labels += [label] * len(files)
        splits[split] = (_objects(texts), np.asarray(labels, dtype=np.int64))
    return RawData(class_names, splits, kind="text")


def _read_text_file(path: Path) -> str:
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError as exc:
        raise StageError(f"{path} is not UTF-8 text: {exc}") from None
    if not text:
        raise StageError(f"{path}: empty text")
    return text


def _objects(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


# ---------------------------------------------------------------- tokenize


def encode_text(splits: dict[str, tuple[np.ndarray, np.ndarray]], params: DataParams) -> Encoded:
    """Train the tokenizer on train, then ids int64 [N, max_length] padded with PAD_ID."""
    tokenizer = train_tokenizer(list(splits["train"][0]), params)
    encoded, truncated = {}, 0
    for name, (texts, y) in splits.items():
        rows = [e.ids for e in tokenizer.encode_batch(list(texts))]
        for text, ids in zip(texts, rows, strict=True):
            if not ids:
                raise StageError(f"{name} text {text[:60]!r} tokenizes to no tokens")
        truncated += sum(len(ids) > params.max_length for ids in rows)
        lengths = np.asarray([min(len(ids), params.max_length) for ids in rows], dtype=np.int64)
        x = np.full((len(rows), params.max_length), PAD_ID, dtype=np.int64)
        for i, ids in enumerate(rows):
            x[i, : lengths[i]] = ids[: lengths[i]]
        encoded[name] = Split(x, y, lengths)
    notes = ()
    if truncated:
        notes = (
            f"truncated {truncated} texts longer than {params.max_length} tokens (data.max_length)",
        )
    return Encoded(
        encoded,
        vocab_size=tokenizer.get_vocab_size(),
        files={TOKENIZER_FILE: tokenizer.to_str()},
        conversions=notes,
    )


def train_tokenizer(texts: list[str], params: DataParams):  # noqa: ANN201 - lazy import
    """A byte-pair-encoding tokenizer with [PAD] = 0 and [UNK] = 1.

    BPE rather than WordPiece: tokenizers' WordPiece trainer numbers its ``##`` tokens
    in hash-map order, so the same texts can train another vocabulary on the next run
    (huggingface/tokenizers#1794) and `dvc repro` would not reproduce the data.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    steps = [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    # NFC without lowercasing, so a composed and a decomposed "é" are still one token.
    tokenizer.normalizer = normalizers.Sequence(steps) if params.lowercase else normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    assert tokenizer.token_to_id(PAD) == PAD_ID and tokenizer.token_to_id(UNK) == 1
    return tokenizer
