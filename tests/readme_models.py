"""The README's "your own backbone" model (my_models.Wide there), importable by Ray workers as
``tests.readme_models:Wide``: any nn.Module built as ``Cls(num_classes, in_channels=...)``."""
import torch.nn as nn


class Wide(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
