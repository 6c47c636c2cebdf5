import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.dataset import load_meta, load_split
from pipeline.distributed import World
from pipeline.errors import StageError
from pipeline.models import SequenceClassifier
from pipeline.params import ModelParams, TrainParams
from pipeline.train import Trainer, _to_device, train
from tests.pipeline.sequence_fixtures import write_series_prepared, write_text_prepared

# augment stays at its default (true): sequences are never augmented, whatever it says.
QUICK = TrainParams(epochs=15, batch_size=16, lr=0.01, seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequences")
    return {
        "text": write_text_prepared(root / "text"),
        "series": write_series_prepared(root / "series"),
    }


def small(name: str) -> ModelParams:
    return ModelParams(name=name, width=16, layers=1, heads=2)


def run(tmp_path, data_dir, model, params=QUICK, tag="run"):
    out = tmp_path / tag
    return train(model, params, data_dir, out / "checkpoint.pt", out / "live"), out


@pytest.mark.parametrize("kind", ["text", "series"])
@pytest.mark.parametrize("name", ["gru", "lstm", "transformer", "cnn1d"])
def test_every_sequence_model_learns_the_rule(tmp_path, prepared, name, kind):
    history, out = run(tmp_path, prepared[kind], small(name))
    assert history[-1].val_acc >= 0.85  # chance: 0.5 (text), 0.33 (series)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    meta = load_meta(prepared[kind])
    assert (checkpoint.spec.kind, checkpoint.spec.name) == (kind, name)
    assert checkpoint.spec.vocab_size == meta.vocab_size
    assert checkpoint.spec.width == 16 and checkpoint.spec.layers == 1
    model = checkpoint.build()
    assert isinstance(model, SequenceClassifier) and not model.training
    val = load_split("val", prepared[kind])
    with torch.no_grad():
        logits = model(torch.from_numpy(val.x), torch.from_numpy(val.mask()))
    accuracy = float((logits.argmax(1).numpy() == val.y).mean())
    assert accuracy == pytest.approx(history[-1].val_acc, abs=1e-6)


def test_rnn_training_is_deterministic_on_cpu(tmp_path, prepared):
    params = TrainParams(epochs=2, batch_size=16, seed=4, device="cpu")
    model = ModelParams(name="lstm", width=8, layers=2, dropout=0.2)
    first, out_a = run(tmp_path, prepared["series"], model, params, "a")
    second, out_b = run(tmp_path, prepared["series"], model, params, "b")
    assert [(h.train_loss, h.val_loss) for h in first] == [
        (h.train_loss, h.val_loss) for h in second
    ]
    a, b = load_checkpoint(out_a / "checkpoint.pt"), load_checkpoint(out_b / "checkpoint.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_batches_are_cut_to_their_longest_row(prepared):
    meta = load_meta(prepared["series"])
    trainer = Trainer(meta, small("gru"), TrainParams(device="cpu"), World())
    data = _to_device(load_split("train", prepared["series"]), torch.device("cpu"))
    index = torch.tensor([0, 5, 9])
    (x, mask), y = trainer._batch(data, index)
    lengths = data.lengths[index]
    assert x.shape == (3, meta.input_shape[0], int(lengths.max()))
    assert mask.dtype == torch.int64 and mask.sum(1).tolist() == lengths.tolist()
    assert y.tolist() == data.y[index].tolist()


@pytest.mark.parametrize(
    ("kind", "name", "what"),
    [("text", "seed_cnn", "an image"), ("series", "mlp", "an image and tabular")],
)
def test_image_model_on_sequence_data_is_one_clear_error(tmp_path, prepared, kind, name, what):
    with pytest.raises(StageError, match=f"model '{name}' is {what} model .* {kind}"):
        run(tmp_path, prepared[kind], ModelParams(name=name))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sequence_model_on_images_is_one_clear_error(tmp_path, prepared_dir):
    with pytest.raises(StageError, match="model 'gru' is a sequence model .* image"):
        run(tmp_path, prepared_dir, ModelParams(name="gru"))
