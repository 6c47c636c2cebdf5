import pytest
import torch

from pipeline.errors import StageError
from pipeline.models import Classifier, ModelSpec, Preprocess, build_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_cnn_matches_the_reference_parameter_count():
    model = build_model(ModelSpec("seed_cnn", input_shape=(3, 32, 32), num_classes=10))
    assert count(model) == 122_570


def test_seed_cnn_layers_are_the_reference_ones():
    model = build_model(ModelSpec("seed_cnn", input_shape=(3, 32, 32), num_classes=10))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (32, (3, 3), (0, 0)),
        (64, (3, 3), (0, 0)),
        (64, (3, 3), (0, 0)),
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(1024, 64), (64, 10)]


def test_seed_cnn_rejects_inputs_too_small():
    with pytest.raises(StageError, match="at least 18x18"):
        build_model(ModelSpec("seed_cnn", input_shape=(1, 8, 8), num_classes=10))


@pytest.mark.parametrize("name", ["seed_cnn", "resnet", "mlp"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_maps_images_to_logits(name, shape):
    model = build_model(ModelSpec(name, input_shape=shape, num_classes=7, width=8))
    assert model(torch.randn(5, *shape)).shape == (5, 7)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(StageError, match="unknown model 'vit'"):
        build_model(ModelSpec("vit", input_shape=(1, 28, 28), num_classes=2))


def test_preprocess_standardises_uint8_pixels():
    pre = Preprocess(mean=[0.5, 0.25], std=[0.5, 0.25])
    pixels = torch.full((1, 2, 2, 2), 255, dtype=torch.uint8)
    out = pre(pixels)
    assert torch.allclose(out[0, 0], torch.ones(2, 2))
    assert torch.allclose(out[0, 1], torch.full((2, 2), 3.0))


def test_classifier_takes_raw_pixels():
    spec = ModelSpec("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(8,))
    model = Classifier(spec, mean=[0.5], std=[0.2])
    assert model(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)).shape == (2, 3)
