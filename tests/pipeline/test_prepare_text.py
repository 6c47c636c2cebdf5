import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import PAD_ID, TOKENIZER_FILE, load_meta, load_split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.prepare import prepare
from tests.conftest import run_prepare

WORDS = {
    "ham": ["see you at lunch", "call me when you are home", "the meeting moved to noon"],
    "spam": ["win a free prize now", "claim your cash reward", "free entry to win cash"],
}


def rows(per_class: int = 10) -> list[tuple[str, str]]:
    """(label, text) pairs, each text a little different."""
    return [
        (label, f"{texts[i % len(texts)]} number {i}")
        for label, texts in WORDS.items()
        for i in range(per_class)
    ]


def write_tsv(path: Path, pairs: list[tuple[str, str]], header: str = "Label\tSMS") -> Path:
    path.write_text(header + "\n" + "".join(f"{label}\t{text}\n" for label, text in pairs))
    return path


def sms_params(path: Path, **kw) -> DataParams:
    return DataParams(
        source="text", path=str(path), text_columns=("SMS",), label_column="Label", **kw
    )


def write_folder(root: Path, splits: dict[str, dict[str, list[str]]]) -> Path:
    for split, classes in splits.items():
        for label, texts in classes.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i:03}.txt").write_text(text)
    return root


def test_tsv_is_split_stratified_tokenized_and_padded(tmp_path):
    path = write_tsv(tmp_path / "sms.tsv", rows(10))
    out = tmp_path / "out"
    meta = prepare(sms_params(path, max_length=8, vocab_size=200), out)
    assert meta.kind == "text" and meta.class_names == ("ham", "spam")
    assert meta.input_shape == (8,) and meta.mean == () and meta.std == ()
    assert meta.split_sizes == {"train": 14, "val": 2, "test": 4}
    assert load_meta(out) == meta
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    assert tokenizer.token_to_id("[PAD]") == PAD_ID == 0 and tokenizer.token_to_id("[UNK]") == 1
    assert meta.vocab_size == tokenizer.get_vocab_size() <= 200
    every = [load_split(name, out) for name in ("train", "val", "test")]
    for split in every:
        assert split.x.dtype == np.int64 and split.x.shape[1] == 8
        assert np.all((split.lengths >= 1) & (split.lengths <= 8))
        mask = split.mask().astype(bool)
        assert np.all(split.x[~mask] == PAD_ID) and np.all(split.x[mask] != PAD_ID)
        for ids, length in zip(split.x, split.lengths, strict=True):
            assert ids[0] != PAD_ID and length == np.count_nonzero(ids)
        assert np.bincount(split.y, minlength=2).min() >= 1  # stratified
    lengths = np.concatenate([s.lengths for s in every])
    assert meta.length_stats == {
        "min": lengths.min(),
        "median": int(np.median(lengths)),
        "max": lengths.max(),
    }


def test_truncation_is_noted_and_rows_match_the_tokenizer(tmp_path):
    path = write_tsv(tmp_path / "sms.tsv", rows(10))
    out = tmp_path / "out"
    meta = prepare(sms_params(path, max_length=4, vocab_size=200), out)
    assert meta.conversions == ("truncated 20 texts longer than 4 tokens (data.max_length)",)
    assert meta.length_stats == {"min": 4, "median": 4, "max": 4}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    test = load_split("test", out)
    texts = [text for _, text in rows(10)]
    encodings = {tuple(tokenizer.encode(t).ids[:4]) for t in texts}
    assert {tuple(ids) for ids in test.x} <= encodings


def test_tokenizer_is_trained_on_train_only(tmp_path):
    root = write_folder(
        tmp_path / "texts",
        {
            "train": {"neg": ["bad awful", "awful bad"] * 3, "pos": ["good fine", "fine good"] * 3},
            "test": {"neg": ["quixotic zephyr"], "pos": ["good zzz"]},
        },
    )
    out = tmp_path / "out"
    meta = prepare(DataParams(source="text", path=str(root), max_length=6), out)
    assert meta.split_sizes == {"train": 10, "val": 2, "test": 2}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    assert not any("q" in token or "z" in token for token in tokenizer.get_vocab())
    test = load_split("test", out)
    unk = tokenizer.token_to_id("[UNK]")
    assert unk == 1
    # "good" is known; every letter of "zzz" is not (z never occurs in train).
    assert list(test.x[1, : test.lengths[1]]) == [tokenizer.token_to_id("good"), 1, 1, 1]
    assert set(test.x[0, : test.lengths[0]].tolist()) > {1}  # q, x, z unknown, the rest not


def test_folder_without_splits_is_one_pool(tmp_path):
    classes = {
        label: [f"{t} {i}" for i in range(5) for t in texts] for label, texts in WORDS.items()
    }
    root = write_folder(tmp_path / "texts", {".": classes})
    meta = prepare(DataParams(source="text", path=str(root)), tmp_path / "out")
    assert meta.class_names == ("ham", "spam")
    assert sum(meta.split_sizes.values()) == 30 and meta.split_sizes["test"] == 6


def test_csv_and_jsonl_with_several_text_columns(tmp_path):
    csv_path = tmp_path / "news.csv"
    lines = ["title,label,body"] + [
        f'"{text.split()[0]}, news",{label},"{text}"' for label, text in rows(8)
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "news.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"title": f"{text.split()[0]}, news", "label": label, "body": text}) + "\n"
            for label, text in rows(8)
        )
    )
    metas = [
        prepare(
            DataParams(source="text", path=str(p), text_columns=("title", "body")),
            tmp_path / p.suffix,
        )
        for p in (csv_path, jsonl)
    ]
    assert metas[0].split_sizes == metas[1].split_sizes == {"train": 10, "val": 2, "test": 4}
    assert metas[0].fingerprint == metas[1].fingerprint  # the same texts, read either way
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / ".csv" / TOKENIZER_FILE))
    assert tokenizer.token_to_id("news") is not None  # a word of the titles only


def test_same_params_same_data_twice(tmp_path):
    path = write_tsv(tmp_path / "sms.tsv", rows(20))
    first = prepare(sms_params(path, vocab_size=100), tmp_path / "a")
    again = prepare(sms_params(path, vocab_size=100), tmp_path / "b")
    other = prepare(sms_params(path, vocab_size=100, seed=1), tmp_path / "c")
    assert first.fingerprint == again.fingerprint != other.fingerprint
    tokenizers = [(tmp_path / d / TOKENIZER_FILE).read_bytes() for d in "ab"]
    assert tokenizers[0] == tokenizers[1]


def test_lowercase_off_keeps_case(tmp_path):
    pairs = [(label, text.upper() if i % 2 else text) for i, (label, text) in enumerate(rows(10))]
    path = write_tsv(tmp_path / "sms.tsv", pairs)
    out = tmp_path / "out"
    prepare(sms_params(path, lowercase=False, vocab_size=300), out)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    assert tokenizer.encode("FREE").ids != tokenizer.encode("free").ids


def test_byte_order_mark_and_crlf_are_read(tmp_path):
    path = tmp_path / "sms.tsv"
    body = "".join(f"{label}\t{text}\r\n" for label, text in rows(10))
    path.write_bytes(("\ufeffLabel\tSMS\r\n" + body).encode())
    out = tmp_path / "out"
    prepare(sms_params(path), out)
    from tokenizers import Tokenizer

    assert not any("\r" in t for t in Tokenizer.from_file(str(out / TOKENIZER_FILE)).get_vocab())


def test_max_per_class_caps_text(tmp_path):
    path = write_tsv(tmp_path / "sms.tsv", rows(20))
    meta = prepare(sms_params(path, max_per_class=2), tmp_path / "out")
    assert meta.split_sizes == {"train": 4, "val": 4, "test": 4}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Label\tSMS\nham\thello\nspam\t   \n", r"sms.tsv:3: empty text in SMS"),
        ("Label\tSMS\nham\thello\n\tworld\n", r"sms.tsv:3: empty label in Label"),
        ("Label\tText\nham\thello\n", r"sms.tsv:2: no column 'SMS' \(columns: Label, Text\)"),
        ("Label\tSMS\nham\thello\textra\n", r"sms.tsv:2: 3 fields, the header has 2"),
        ("", r"sms.tsv is empty"),
        ("Label\tSMS\n", r"sms.tsv has no rows"),
        (b"Label\tSMS\nham\t\xff\n", r"sms.tsv is not UTF-8"),
    ],
)
def test_bad_tsv(tmp_path, content, message):
    path = tmp_path / "sms.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StageError, match=message):
        prepare(sms_params(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_that_normalizes_to_nothing(tmp_path):
    pairs = rows(10)
    pairs[3] = ("ham", "\u0301")  # a lone combining accent: stripped with the accents
    path = write_tsv(tmp_path / "sms.tsv", pairs)
    with pytest.raises(StageError, match=r"text '\u0301' tokenizes to no tokens"):
        prepare(sms_params(path), tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": "ham"}', r"news.jsonl:2: no column 'text' \(columns: label\)"),
        ("[1, 2]", r"news.jsonl:2: expected a JSON object, got list"),
        ("{oops", r"news.jsonl:2: not JSON"),
        ('{"text": null, "label": "ham"}', r"news.jsonl:2: empty text in text"),
    ],
)
def test_bad_jsonl(tmp_path, line, message):
    path = tmp_path / "news.jsonl"
    path.write_text('{"text": "hello", "label": "ham"}\n' + line + "\n")
    with pytest.raises(StageError, match=message):
        prepare(DataParams(source="text", path=str(path)), tmp_path / "out")


def test_bad_paths_and_params(tmp_path):
    def fails(message: str, **kw) -> None:
        with pytest.raises(StageError, match=message):
            prepare(DataParams(source="text", **kw), tmp_path / "out")

    fails("data.path must name")
    fails("not found", path=str(tmp_path / "absent.tsv"))
    (tmp_path / "notes.md").write_text("label\ttext\n")
    fails(r"must end in .tsv, .csv or .jsonl", path=str(tmp_path / "notes.md"))
    good = str(write_tsv(tmp_path / "ok.tsv", rows(5), header="label\ttext"))
    fails("data.vocab_size must be at least 3", path=good, vocab_size=2)
    fails("data.max_length must be at least 1", path=good, max_length=0)
    fails("data.text_columns must name at least one", path=good, text_columns=())


def test_folder_errors(tmp_path):
    texts = {"neg": ["bad"] * 4, "pos": ["good"] * 4}
    root = write_folder(tmp_path / "a", {"train": texts, "test": {**texts, "meh": ["so so"]}})
    with pytest.raises(StageError, match="class 'meh' is in test but not in train"):
        prepare(DataParams(source="text", path=str(root)), tmp_path / "out")
    root = write_folder(tmp_path / "b", {"train": texts, "test": texts})
    (root / "test" / "pos" / "000.txt").write_text(" \n ")
    with pytest.raises(StageError, match=r"test/pos/000.txt: empty text"):
        prepare(DataParams(source="text", path=str(root)), tmp_path / "out")
    root = write_folder(tmp_path / "c", {"train": texts})
    with pytest.raises(StageError, match="has a train/ folder but no test/ folder"):
        prepare(DataParams(source="text", path=str(root)), tmp_path / "out")


def test_cli_prints_one_line_for_bad_input(tmp_path):
    path = write_tsv(tmp_path / "sms.tsv", rows(5))
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: text\n  path: {path}\n  text_columns: [sms]\n")
    result = run_prepare(params, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {path}:2: no column 'sms' (columns: Label, SMS)"]
