"""An ibau plugin: registers the ``lenet5`` architecture and the ``frame-yellow-1px`` probe.

ibau calls ``register()`` through the ``ibau.plugins`` entry point (see pyproject.toml), or when
this file's package is named with ``ibau --plugin path/to/__init__.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNet5", "frame", "register"]


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 RGB inputs (as used on CIFAR-10 and GTSRB in the backdoor literature)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def frame(x: Tensor, gen: torch.Generator, width: int = 1) -> Tensor:
    """Paint a yellow frame ``width`` pixels wide around each image (pixels in [0, 1])."""
    out = x.clone()
    colour = torch.tensor([1.0, 0.85, 0.0] if x.shape[1] == 3 else [0.9], dtype=x.dtype).view(1, -1, 1, 1)
    out[:, :, :width, :] = colour
    out[:, :, -width:, :] = colour
    out[:, :, :, :width] = colour
    out[:, :, :, -width:] = colour
    return out


def register() -> None:
    from ibau_cli.archs import ArchSpec, register_arch
    from ibau_cli.probes import register_probe
    from ibau_cli.probes.patterns import PatternProbe

    register_arch(
        ArchSpec(
            name="lenet5",
            factory=lambda n: LeNet5(n),
            classifier_key="fc3.weight",
            input_size=(32, 32),
            description="LeNet-5, 32x32 RGB (example plugin)",
        )
    )
    register_probe(PatternProbe("frame-yellow-1px", "patch", frame))
