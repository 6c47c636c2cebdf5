import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

from pipeline.dataset import Meta
from pipeline.errors import StageError
from pipeline.models import (
    FCN,
    ModelSpec,
    SequenceClassifier,
    build_model,
    build_module,
    reverse_within_length,
)

NAMES = ("gru", "lstm", "transformer", "cnn1d")
KINDS = ("text", "series")
VOCAB, CHANNELS, STEPS = 30, 3, 12
MEAN, STD = (0.5, -1.0, 2.0), (2.0, 0.5, 1.0)


def spec(name: str, kind: str, **overrides) -> ModelSpec:
    shape = (STEPS,) if kind == "text" else (CHANNELS, STEPS)
    values = {"width": 8, "layers": 2, "heads": 2, "vocab_size": VOCAB if kind == "text" else 0}
    return ModelSpec(name, shape, 3, kind=kind, **{**values, **overrides})


def meta_of(spec: ModelSpec, mean: tuple, std: tuple) -> Meta:
    """The Meta that data fitting ``spec`` would have (what build_module reads)."""
    classes = tuple(f"class_{i}" for i in range(spec.num_classes))
    return Meta(classes, spec.input_shape, mean, std, {}, "", {}, kind=spec.kind)


def model(name: str, kind: str, **overrides) -> SequenceClassifier:
    torch.manual_seed(0)
    stats = (MEAN, STD) if kind == "series" else ((), ())
    return SequenceClassifier(spec(name, kind, **overrides), *stats).eval()


def values(kind: str, n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "text":
        return torch.randint(1, VOCAB, (n, steps), generator=generator)
    return 3 * torch.randn(n, CHANNELS, steps, generator=generator) + 1


def with_padding(kind: str, row: torch.Tensor, steps: int, generator) -> torch.Tensor:  # noqa: ANN001
    """``row`` followed by arbitrary pad values (out-of-vocabulary ids, NaN) up to ``steps``."""
    extra = steps - row.shape[-1]
    if kind == "text":
        pad = torch.randint(VOCAB, 10**6, (1, extra), generator=generator)
    else:
        pad = torch.randn(1, CHANNELS, extra, generator=generator) * 1e3
        pad[..., ::2] = float("nan")
    return torch.cat([row, pad], dim=-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_do_not_depend_on_trailing_padding(name, kind):
    net = model(name, kind, bidirectional=True)
    generator = torch.Generator().manual_seed(1)
    lengths = [1, 2, 5, 9]
    rows = [values(kind, 1, n, generator) for n in lengths]
    with torch.no_grad():
        alone = [net(r, torch.ones(1, r.shape[-1], dtype=torch.int64)) for r in rows]
        for extra in (5, 20):
            steps = max(lengths) + extra
            batch = torch.cat([with_padding(kind, r, steps, generator) for r in rows])
            mask = (torch.arange(steps)[None] < torch.tensor(lengths)[:, None]).long()
            padded = net(batch, mask)
            assert torch.isfinite(padded).all()
            torch.testing.assert_close(padded, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_unidirectional_rnn_is_masked_too():
    net = model("gru", "series", bidirectional=False, layers=1)
    x = values("series", 1, 6, torch.Generator().manual_seed(2))
    padded = torch.cat([x, torch.full((1, CHANNELS, 7), 9.0)], dim=-1)
    mask = (torch.arange(13) < 6).long()[None]
    with torch.no_grad():
        torch.testing.assert_close(net(padded, mask), net(x, mask[:, :6]), atol=1e-5, rtol=0)


def test_reverse_within_length_is_an_involution():
    h = torch.arange(10.0).view(2, 5, 1)
    lengths = torch.tensor([3, 5])
    flipped = reverse_within_length(h, lengths)
    assert flipped[:, :, 0].tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]
    assert torch.equal(reverse_within_length(flipped, lengths), h)


def test_fcn_batch_statistics_count_real_steps_only():
    fcn = FCN(ModelSpec("cnn1d", (CHANNELS, STEPS), 2, width=2, kind="series"), CHANNELS)
    h = torch.randn(4, 6, CHANNELS)
    lengths = torch.tensor([6, 3, 4, 2])
    stats = []
    for extra in (0, 9):
        padded = torch.cat([h, torch.randn(4, extra, CHANNELS) * 100], dim=1)
        padded = torch.where((torch.arange(6 + extra) < lengths[:, None])[..., None], padded, 0)
        for norm in fcn.norms:
            norm.reset_running_stats()
        fcn.train()(padded, torch.arange(6 + extra)[None] < lengths[:, None])
        stats.append([n.running_mean.clone() for n in fcn.norms])
    for first, second in zip(*stats, strict=True):
        torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


def test_the_fcn_is_wang_et_al_at_width_32():
    net = model("cnn1d", "series", width=32).network
    convs = [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in net.convs]
    assert convs == [(128, 7, 3), (256, 5, 2), (128, 3, 1)]


def _export(net: torch.nn.Module, kind: str, path, dynamo: bool) -> None:  # noqa: ANN001
    generator = torch.Generator().manual_seed(3)
    example = (
        values(kind, 3, 5, generator),
        torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1, 0, 0, 0, 0]]),
    )
    names = ["values", "mask"]
    length_axis = 1 if kind == "text" else 2
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch, steps = torch.export.Dim("batch"), torch.export.Dim("steps", min=2)
            shapes = {"values": {0: batch, length_axis: steps}, "mask": {0: batch, 1: steps}}
            torch.onnx.export(
                net,
                example,
                path,
                dynamo=True,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=shapes,
                opset_version=18,
                external_data=False,
            )
        else:
            axes = {"values": {0: "n", length_axis: "t"}, "mask": {0: "n", 1: "t"}}
            torch.onnx.export(
                net,
                example,
                path,
                dynamo=False,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "n"}},
                opset_version=18,
            )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("name", "dynamo"),
    # GRU/LSTM through the legacy exporter: torch 2.13's dynamo exporter bakes the length of
    # nn.GRU/LSTM's output into a Reshape for some configurations.
    [("gru", False), ("lstm", False), ("transformer", True), ("cnn1d", True)],
)
def test_exports_with_dynamic_batch_and_length_and_matches_onnxruntime(
    tmp_path, name, kind, dynamo
):
    import onnxruntime as ort

    net = model(name, kind)
    _export(net, kind, tmp_path / "model.onnx", dynamo)
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(4)
    for n, steps in ((1, 2), (7, 7), (64, 30)):
        x = values(kind, n, steps, generator)
        lengths = torch.randint(1, steps + 1, (n,), generator=generator)
        lengths[0] = steps
        mask = (torch.arange(steps)[None] < lengths[:, None]).long()
        with torch.no_grad():
            expected = net(x, mask).numpy()
        (got,) = session.run(None, {"values": x.numpy(), "mask": mask.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("gru", "image", "model 'gru' is a sequence model but the prepared data is image"),
        ("resnet", "series", "model 'resnet' is an image model but the prepared data is series"),
        ("mlp", "text", "set model.name to one of gru, lstm, transformer, cnn1d"),
        ("rnn", "text", "unknown model 'rnn'"),
    ],
)
def test_model_of_the_wrong_kind_is_one_clear_error(name, kind, message):
    shape = (1, 8, 8) if kind == "image" else (2, 8)
    with pytest.raises(StageError, match=message):
        wrong = ModelSpec(name, shape, 2, kind=kind)
        build_module(wrong, meta_of(wrong, (0.0,), (1.0,)))
    with pytest.raises(StageError, match=message):
        (build_model if kind == "image" else lambda s: SequenceClassifier(s, (), ()))(
            ModelSpec(name, shape, 2, kind=kind)
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 10, "heads": 4}, r"model.width \(10\) must be a multiple of model.heads"),
        ({"layers": 0}, "model.layers must be at least 1, got 0"),
        ({"dropout": 1.0}, r"model.dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_sizes_are_clear_errors(overrides, message):
    with pytest.raises(StageError, match=message):
        model("transformer", "text", **overrides)


def test_specs_round_trip_and_old_checkpoints_read_as_images():
    text = spec("lstm", "text", bidirectional=False, dropout=0.3)
    assert ModelSpec.from_dict(text.to_dict()) == text
    old = {"name": "mlp", "input_shape": [1, 8, 8], "num_classes": 3, "width": 4, "hidden": [16]}
    restored = ModelSpec.from_dict(old)
    assert restored.kind == "image" and restored.vocab_size == 0 and restored.channels == 1
    assert isinstance(build_module(restored, meta_of(restored, (0.5,), (0.2,))), torch.nn.Module)
