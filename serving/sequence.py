"""Sequence models: requests of different lengths in one batch, and raw text in.

A model whose contract declares padded sequence inputs (serving/contract.py) answers a
row the same however far it is padded, so with ``--sequence-batching pad`` requests of
different lengths share a batch, each padded input right-padded to the batch's longest
with its pad value (``batching.pad_merge``). ``bucket`` does the same within power-of-two
length classes (1, 2, 3-4, 5-8, ..., 33-64): padding at most doubles a row's steps, where
one long request in a batch of short ones multiplies theirs (a GRU's cost follows the
padded length: benchmarks/bench_sequence_batching.py). ``equal`` keeps Triton's rule:
only equal shapes merge. Merging lengths is refused (equal shapes only) when an output has
a dynamic dim besides the batch: its rows' lengths would follow the batch, not the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.contract import ModelContract, SequencePreprocessing, Signature
from serving.protocol import ProtocolError

log = logging.getLogger("serving")


@dataclass(frozen=True)
class SequenceInputs:
    """What a sequence model's requests must satisfy, and which of them may batch together.

    ``axes`` holds, per signature input, its padded axis (0: not padded; the batch axis is
    never one). ``pad``: requests of different lengths merge (their group ignores the
    padded axes), within power-of-two length classes if ``buckets``; otherwise only equal
    shapes do.
    """

    axes: tuple[int, ...]
    names: tuple[str, ...]  # the padded inputs, in signature order
    min_length: int
    max_length: int
    pad: bool
    padding: dict[str, tuple[int, float]]  # name -> (axis, pad value): what pad_merge needs
    ids: tuple[str, int] | None = None  # a text model's ids input and its vocabulary size
    buckets: bool = False

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Every padded input has one length, within the contract's bounds (400 if not)."""
        lengths = {name: inputs[name].shape[self.padding[name][0]] for name in self.names}
        if len(set(lengths.values())) > 1:
            said = ", ".join(f"'{n}' {n_}" for n, n_ in lengths.items())
            raise ProtocolError(f"sequence inputs must share one length; got {said}")
        length = next(iter(lengths.values()))
        if not self.min_length <= length <= self.max_length:
            raise ProtocolError(
                f"sequence length {length} is outside the model's {self.min_length} to "
                f"{self.max_length} (pad shorter sequences with mask 0; truncate longer ones)"
            )

    def check_values(self, inputs: dict[str, np.ndarray]) -> None:
        """Token ids within the vocabulary: one bad id would fail every request in its batch."""
        if self.ids is None:
            return
        name, vocab = self.ids
        ids = inputs[name]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ProtocolError(
                f"input '{name}' has token ids outside the vocabulary of {vocab} (0 to {vocab - 1})"
            )

    def group(self, arrays: list[np.ndarray]) -> tuple:
        """The batch group: non-batch shapes, without the padded axes when pad-merging."""
        if not self.pad:
            return tuple(a.shape[1:] for a in arrays)
        key = tuple(
            a.shape[1:axis] + a.shape[axis + 1 :] if axis else a.shape[1:]
            for a, axis in zip(arrays, self.axes, strict=True)
        )
        if not self.buckets:
            return key
        at = next(i for i, axis in enumerate(self.axes) if axis)
        length = arrays[at].shape[self.axes[at]]
        return (*key, (length - 1).bit_length())  # 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3...


def sequence_inputs(
    signature: Signature, contract: ModelContract | None, policy: str, vocab: int | None = None
) -> SequenceInputs | None:
    """The rules for a sequence model's requests (None for any other model), pad-merging
    when ``policy`` is "pad" or "bucket" and the outputs allow it."""
    sequence = None if contract is None else contract.sequence
    if sequence is None or not signature.batching:
        return None
    padding = {p.name: (p.axis, p.pad_value) for p in sequence.padded}
    pad = policy in ("pad", "bucket")
    varying = [o.name for o in signature.outputs if -1 in o.shape[1:]]
    if pad and varying:
        log.warning(
            "sequence batching: output %s has a dynamic dim besides the batch, so requests "
            "of different lengths cannot share a batch; merging equal shapes only",
            ", ".join(varying),
        )
        pad = False
    said = {"pad": "pad to the longest in the batch", "bucket": "pad within length classes"}
    log.info("sequence batching: %s", said[policy] if pad else "equal")
    ids = _ids_input(sequence)
    return SequenceInputs(
        axes=tuple(padding[s.name][0] if s.name in padding else 0 for s in signature.inputs),
        names=tuple(s.name for s in signature.inputs if s.name in padding),
        min_length=max(1, sequence.min_length),
        max_length=sequence.max_length,
        pad=pad,
        padding=padding,
        ids=None if ids is None or vocab is None else (ids, vocab),
        buckets=pad and policy == "bucket",
    )


def _ids_input(sequence: SequencePreprocessing) -> str | None:
    """A text model's ids input: the padded input that is not the mask."""
    if sequence.kind != "text":
        return None
    return next((p.name for p in sequence.padded if p.name != sequence.mask_input), None)


class TextEncoder:
    """Raw text to a text model's ids and mask, with the tokenizer its contract carries."""

    def __init__(self, sequence: SequencePreprocessing) -> None:
        from tokenizers import Tokenizer  # the serve extra; only text models need it

        assert sequence.tokenizer is not None  # from_json refuses a text model without one
        self._tokenizer = tokenizer = Tokenizer.from_str(sequence.tokenizer)
        tokenizer.no_padding()  # padding is ours: to the longest text, with the contract's value
        tokenizer.enable_truncation(sequence.max_length)
        self.vocab = tokenizer.get_vocab_size()
        ids = _ids_input(sequence)
        assert ids is not None
        self._ids, self._mask = ids, sequence.mask_input
        self._pad = int(sequence.padded_input(ids).pad_value)  # type: ignore[union-attr]
        self._min_length = max(1, sequence.min_length)

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """ids and mask [len(texts), L], L the longest text's tokens (at least min_length)."""
        # Without character offsets: 28 µs for an SMS against encode()'s 36 (bench's mix).
        rows = [e.ids for e in self._tokenizer.encode_batch_fast(texts)]
        for i, row in enumerate(rows):
            if not row:
                which = "the text" if len(rows) == 1 else f"text {i}"
                raise ProtocolError(f"{which} yields no tokens")
        length = max(self._min_length, max(len(r) for r in rows))
        ids = np.full((len(rows), length), self._pad, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {self._ids: ids, self._mask: mask}


def texts(body: bytes, content_type: str, max_texts: int) -> tuple[list[str], bool]:
    """The texts a /v1/classify body carries, and whether it sent a list ("texts").

    JSON (``{"text": "..."}`` or ``{"texts": [...]}``) when the content type says JSON;
    any other body is one UTF-8 text.
    """
    if "json" not in content_type.lower():
        return [_utf8(body)], False
    import json

    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"malformed JSON in request: {exc}") from None
    if not isinstance(payload, dict) or len(payload.keys() & {"text", "texts"}) != 1:
        raise ProtocolError('send {"text": "..."} or {"texts": ["...", ...]}')
    if "text" in payload:
        return [_text(payload["text"], "'text'")], False
    items = payload["texts"]
    if not isinstance(items, list) or not items:
        raise ProtocolError("'texts' must be a non-empty list of strings")
    if len(items) > max_texts:
        raise ProtocolError(
            f"'texts' has {len(items)} texts; this server takes at most {max_texts}"
        )
    return [_text(item, f"texts[{i}]") for i, item in enumerate(items)], True


def _utf8(body: bytes) -> str:
    try:
        return _text(body.decode("utf-8"), "the body")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the body is not UTF-8 text: {exc}") from None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ProtocolError(f"{what} is empty")
    return value
