"""Backbones per dataset family, built by name so a checkpoint can record how to rebuild its model.

Families: ``linear`` (flattened pixels -> logits, the ConfTr MNIST linear model), ``small_cnn`` (digits,
MNIST), ``cifar_resnet32`` (He et al. 2016; the CIFAR-LT literature's backbone), ``cifar_resnet18``
(torchvision ResNet-18 with a 3x3 stem for 32x32 inputs), ``imagenet_resnet50`` (torchvision ResNet-50,
ImageNet-LT), ``text`` (EmbeddingBag bag-of-words classifier for 20 Newsgroups), ``tfidf`` (TF-IDF of the token ids, idf
fit on the training split, then a one-hidden-layer MLP), ``head`` (a linear or MLP head on frozen features,
:mod:`stages.features`).
Image models take float [B, C, H, W] in [0, 1]; the text models take int64 token ids [B, L], 0 = padding; the
head takes float features [B, D].

Frozen features are the input of a model's last ``nn.Linear`` (:func:`penultimate_features`): every family here
ends in one, and so does any user model that follows the same convention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, num_classes: int, in_features: int = 784):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv layers, adaptive pooling to 4x4, one hidden layer: works for 8x8 digits and 28x28 MNIST."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class LeNet(nn.Module):
    """LeNet-style CNN for 28x28 images (MNIST): two 5x5 conv + max-pool stages, then a 128-unit hidden layer. Pooling
    early makes it about 3x cheaper than :class:`SmallCNN` on MNIST (the CPU-budget converged MNIST backbone)."""

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(64 * 4 * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.25),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class _BasicBlockA(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut (zero-padded channels), as in LDAM's code."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; n=5 gives ResNet-32 (0.46M parameters)."""

    def __init__(self, num_classes: int, depth: int = 32, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, the usual 32x32 adaptation."""
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def imagenet_resnet50(num_classes: int, in_channels: int = 3, depth: int = 50) -> nn.Module:
    """torchvision ResNet-50 (or ResNet-18/34 via ``depth``) from scratch: no downloaded weights, no network."""
    from torchvision import models

    if depth not in (18, 34, 50, 101):
        raise ValueError(f"ImageNet ResNet depth must be 18, 34, 50 or 101, got {depth}")
    m = getattr(models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m


class TextBag(nn.Module):
    """Bag-of-words classifier: mean of token embeddings (padding id 0 ignored), one hidden layer."""

    def __init__(self, num_classes: int, vocab_size: int, dim: int = 128, hidden: int = 128):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens):
        return self.head(self.embed(tokens))


class TfidfMLP(nn.Module):
    """TF-IDF of the token ids (sublinear tf, idf fit on the training split, L2-normalised rows: scikit-learn's
    ``TfidfVectorizer(sublinear_tf=True)``), then one hidden layer. The hidden layer's output is the penultimate
    feature a frozen head trains on.

    >>> m = TfidfMLP(3, idf=[0.0, 0.0, 1.0, 2.0], hidden=8)
    >>> m(torch.tensor([[2, 3, 3, 0]])).shape
    torch.Size([1, 3])
    """

    def __init__(self, num_classes: int, idf: list[float], hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        idf = torch.as_tensor(idf, dtype=torch.float32)
        idf[:2] = 0.0  # padding and unknown ids carry no weight
        self.register_buffer("idf", idf)
        self.body = nn.Sequential(nn.Linear(len(idf), hidden), nn.ReLU(), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, num_classes)

    def tfidf(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(tokens.shape[0], self.idf.shape[0], device=tokens.device)
        counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1.0)), counts)
        return F.normalize(tf * self.idf, dim=1)

    def forward(self, tokens):
        return self.fc(self.body(self.tfidf(tokens)))


class Head(nn.Module):
    """A classifier on frozen features: linear (``hidden=0``, ConfTr's re-initialised logits layer) or one hidden
    layer."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or in_features, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (in registration order): its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: frozen features are the input of the "
                         "model's last nn.Linear (give a model that ends in one)")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of a batch: the input of the model's last ``nn.Linear`` and the model's output.

    >>> f, z = penultimate_features(Head(3, 4, hidden=5).eval(), torch.zeros(2, 4))
    >>> tuple(f.shape), tuple(z.shape)
    ((2, 5), (2, 3))
    """
    seen = []
    handle = last_linear(model).register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the last nn.Linear of {type(model).__name__} ran {len(seen)} times in one forward pass; "
                         "frozen features need it to run once")
    return seen[0].flatten(1), logits


MODEL_FAMILIES = {
    "linear": Linear,
    "small_cnn": SmallCNN,
    "lenet": LeNet,
    "cifar_resnet32": lambda num_classes, **kw: CifarResNet(num_classes, depth=32, **kw),
    "cifar_resnet": CifarResNet,
    "cifar_resnet18": cifar_resnet18,
    "imagenet_resnet50": imagenet_resnet50,
    "imagenet_resnet18": lambda num_classes, **kw: imagenet_resnet50(num_classes, depth=18, **kw),
    "imagenet_resnet": imagenet_resnet50,  # the manifest's hint for ImageFolder data
    "text": TextBag,
    "tfidf": TfidfMLP,
    "head": Head,
}


def build_model(family: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a backbone by family name, or ``"package.module:Class"`` for your own model (called as
    ``Class(num_classes=..., **kwargs)``); ``kwargs`` go to its constructor and are stored in checkpoints.

    >>> m = build_model("small_cnn", 10, in_channels=1)
    >>> m(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if ":" in family:  # "package.module:Class": a user's model, importable wherever the stage runs
        import importlib

        module, _, attr = family.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model family {family!r}: cannot import {attr!r} from module {module!r} ({e})") from e
        return factory(num_classes=num_classes, **kwargs)
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(MODEL_FAMILIES)} "
                         "or 'package.module:Class'")
    return MODEL_FAMILIES[family](num_classes=num_classes, **kwargs)
