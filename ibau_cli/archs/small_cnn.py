"""A small CNN used by ``ibau demo`` and the tests: fast on a CPU, with BatchNorm and dropout."""

from __future__ import annotations

from torch import Tensor, nn

from . import ArchSpec, register_arch


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.classifier = nn.Linear(4 * width * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


register_arch(
    ArchSpec(
        name="small-cnn",
        factory=lambda n: SmallCNN(n),
        classifier_key="classifier.weight",
        input_size=(32, 32),
        channels=3,
        description="3-conv CNN with BatchNorm (ibau demo and tests)",
    )
)
