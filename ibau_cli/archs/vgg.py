"""The small VGG of the I-BAU paper's CIFAR-10 experiments.

Three blocks of two (conv 3x3, BatchNorm, ELU), each followed by 2x2 max-pool and dropout
(0.3, 0.4, 0.4), then one linear layer. 32x32 inputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import ArchSpec, register_arch


def _block(c_in: int, c_out: int, p_drop: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ELU(),
        nn.MaxPool2d(2),
        nn.Dropout(p_drop),
    )


class SmallVGG(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width, 0.3),
            _block(width, 2 * width, 0.4),
            _block(2 * width, 4 * width, 0.4),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


register_arch(
    ArchSpec(
        name="small-vgg",
        factory=lambda n: SmallVGG(n),
        classifier_key="classifier.weight",
        input_size=(32, 32),
        channels=3,
        description="I-BAU paper's CIFAR-10 VGG: 3x(2x conv-BN-ELU, max-pool, dropout), linear",
    )
)
