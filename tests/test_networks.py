"""Models built from the config: ``networks.build_model(cfg)`` picks ``TRAIN.MODEL_TYPE`` from the registry."""

import pytest
import torch
from torch import nn

from ptengine.config import ConfigError, load_config
from ptengine.networks import MODEL_REGISTRY, build_model


def model_for(*opts) -> nn.Module:
    return build_model(load_config(None, list(opts)))


def test_the_registry_holds_both_models():
    assert {"simple_cnn", "resnet18"} <= set(MODEL_REGISTRY)


def test_simple_cnn_has_the_lenet_layers():
    model = model_for("TRAIN.MODEL_TYPE", "simple_cnn", "DATA.INPUT_DIM", "1",
                      "DATA.CLASSES", "['a', 'b', 'c', 'd']")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [
        (6, 1, 5, 5), (6,),  # conv 5x5, 1 -> 6 channels (DATA.INPUT_DIM in)
        (16, 6, 5, 5), (16,),  # conv 5x5, 6 -> 16
        (120, 400), (120,),  # 16 x 5 x 5 features after two 2x2 max-pools of a 32x32 image
        (84, 120), (84,),
        (4, 84), (4,),  # one output per class in DATA.CLASSES
    ]
    assert [type(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))] == \
        [nn.Conv2d, nn.MaxPool2d, nn.Conv2d, nn.MaxPool2d, nn.Linear, nn.Linear, nn.Linear]


@pytest.mark.parametrize("input_dim", [1, 3])
def test_simple_cnn_maps_a_batch_of_32x32_images_to_class_logits(input_dim):
    model = model_for("DATA.INPUT_DIM", str(input_dim))
    assert model(torch.randn(5, input_dim, 32, 32)).shape == (5, 10)
    assert sum(p.numel() for p in model_for().parameters()) == 62006  # the classic LeNet-5 count for RGB


def test_resnet18_keeps_small_images_whole_with_a_3x3_stem_and_no_maxpool():
    model = model_for("TRAIN.MODEL_TYPE", "resnet18", "DATA.INPUT_DIM", "1")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10

    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
        features = model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 1, 32, 32)))))
    assert features.shape == (1, 64, 32, 32)  # full resolution after the stem


def test_an_unknown_model_type_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="unknown TRAIN.MODEL_TYPE 'vgg'; choose one of resnet18, simple_cnn"):
        model_for("TRAIN.MODEL_TYPE", "vgg")


def test_the_seed_fixes_the_initial_weights():
    torch.manual_seed(5)
    first = model_for().state_dict()
    torch.manual_seed(5)
    second = model_for().state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
