"""harness.utils.classifier: n-class heads on torchvision-shaped models; local weights only, no torchvision
needed (the models below have torchvision's layouts)."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from torch import nn

from harness.utils.torch_utils import load_classifier, reshape_classifier_output


class ResNetish(nn.Module):
    """torchvision ResNet's shape: a backbone, then `fc`."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv1(x)).flatten(1))


class VGGish(nn.Module):
    """torchvision VGG / MobileNet's shape: `classifier` is a Sequential ending in a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 1000))

    def forward(self, x):
        return self.classifier(self.features(x))


class SqueezeNetish(nn.Module):
    """torchvision SqueezeNet's shape: the classifier's output layer is a 1x1 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(8, 1000, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


class Plain(nn.Module):
    """No named head: the last Linear is the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 1000))

    def forward(self, x):
        return self.body(x)


X = torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("cls,path", [(ResNetish, "fc"), (VGGish, "classifier.3"),
                                      (SqueezeNetish, "classifier.1"), (Plain, "body.3")])
def test_reshape_classifier_output(cls, path):
    model = cls()
    new = reshape_classifier_output(model, 7)
    assert new is model.get_submodule(path)
    assert model(X).shape == (2, 7)
    assert reshape_classifier_output(model, 7) is None  # already 7: kept
    assert model.get_submodule(path) is new


def test_reshape_needs_an_output_layer():
    with pytest.raises(ValueError, match="no output layer"):
        reshape_classifier_output(nn.Sequential(nn.Conv2d(1, 1, 1)), 3)
    with pytest.raises(ValueError, match="n >= 1"):
        reshape_classifier_output(ResNetish(), 0)


def test_load_classifier_local_weights(tmp_path):
    torch.manual_seed(0)
    pretrained = ResNetish()
    path = tmp_path / "resnetish.pt"
    torch.save(pretrained.state_dict(), path)
    model = load_classifier(ResNetish, n=3, weights=path)
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight)
    assert model.fc.weight.shape == (3, 8) and not model.fc.weight.any() and not model.fc.bias.any()
    assert model.fc.weight.requires_grad
    assert torch.equal(model(X), torch.zeros(2, 3))

    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "wrapped.pt")
    wrapped = load_classifier(ResNetish, 3, tmp_path / "wrapped.pt")
    assert torch.equal(wrapped.conv1.bias, pretrained.conv1.bias)


def test_load_classifier_name_forms():
    assert load_classifier(functools.partial(VGGish), n=4)(X).shape == (2, 4)
    assert load_classifier(Plain(), n=2)(X).shape == (2, 2)
    small = load_classifier("harness.models:SmallCNN", n=3)
    assert small.head.out_features == 3
    assert load_classifier("harness.models.SmallCNN", n=5).head.out_features == 5


def test_load_classifier_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        load_classifier(ResNetish, 2, weights="https://download.pytorch.org/models/resnet18.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_classifier(ResNetish, 2, weights=tmp_path / "missing.pt")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_bare_torchvision_name_without_torchvision():
    with pytest.raises(ImportError, match="torchvision is not installed"):
        load_classifier("resnet18", 2)
