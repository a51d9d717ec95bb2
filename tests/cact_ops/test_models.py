"""Backbones built by name: output shapes, sizes, the text model's padding, bad names."""
from __future__ import annotations

import pytest
import torch

from cact_ops.models import MODEL_FAMILIES, CifarResNet, build_model


@pytest.mark.parametrize(
    "family,kwargs,x",
    [("linear", {"in_features": 10}, torch.randn(3, 10)),
     ("linear", {}, torch.randn(3, 1, 28, 28)),  # flattens images, 784 inputs by default
     ("small_cnn", {"in_channels": 1}, torch.randn(3, 1, 8, 8)),
     ("small_cnn", {"in_channels": 1}, torch.randn(3, 1, 28, 28)),
     ("small_cnn", {"in_channels": 3}, torch.randn(3, 3, 32, 32)),
     ("cifar_resnet32", {}, torch.randn(2, 3, 32, 32)),
     ("cifar_resnet", {"depth": 20}, torch.randn(2, 3, 32, 32))],
)
def test_build_model_output_shape(family, kwargs, x):
    model = build_model(family, 7, **kwargs)
    out = model(x)
    assert out.shape == (x.shape[0], 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("family,x", [("cifar_resnet18", torch.randn(2, 3, 32, 32)),
                                      ("imagenet_resnet50", torch.randn(1, 3, 64, 64))])
def test_torchvision_backbones(family, x):
    pytest.importorskip("torchvision")
    model = build_model(family, 5).eval()
    assert model(x).shape == (x.shape[0], 5)


def test_cifar_resnet32_has_the_published_size():
    # ResNet-32 with option-A shortcuts: 0.46M parameters (He et al. 2016, Table 6).
    n = sum(p.numel() for p in build_model("cifar_resnet32", 10).parameters())
    assert n == pytest.approx(0.46e6, rel=0.01)


def test_text_model_ignores_padding():
    model = build_model("text", 4, vocab_size=50, dim=8, hidden=8).eval()
    a = model(torch.tensor([[5, 7, 0, 0, 0]]))
    b = model(torch.tensor([[5, 7]]))
    torch.testing.assert_close(a, b)
    assert model(torch.randint(1, 50, (6, 12))).shape == (6, 4)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model family 'vit'"):
        build_model("vit", 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        build_model("linear", 1)
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        CifarResNet(10, depth=30)
    assert {"linear", "small_cnn", "cifar_resnet32", "cifar_resnet18", "imagenet_resnet50", "text"} <= set(MODEL_FAMILIES)


def test_build_model_imports_a_user_model_by_module_path():
    m = build_model("cact_ops.models:SmallCNN", 4, in_channels=1)
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="cannot import 'Nope'"):
        build_model("cact_ops.models:Nope", 4)
