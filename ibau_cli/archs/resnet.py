"""ResNets with torchvision's parameter names, so torchvision checkpoints load unchanged.

``resnet18`` / ``resnet50``: the ImageNet layout (7x7 stride-2 stem and max-pool).
``resnet18-cifar``: the common 32x32 variant (3x3 stride-1 stem, no max-pool), same names.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import ArchSpec, register_arch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        *,
        small_input: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.c_in = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [block(self.c_in, planes, stride)]
        self.c_in = planes * block.expansion
        layers += [block(self.c_in, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

register_arch(
    ArchSpec(
        name="resnet18",
        factory=lambda n: ResNet(BasicBlock, [2, 2, 2, 2], n),
        classifier_key="fc.weight",
        input_size=(224, 224),
        channels=3,
        description="torchvision-compatible ResNet-18 (ImageNet stem)",
        defaults=_IMAGENET,
    )
)
register_arch(
    ArchSpec(
        name="resnet50",
        factory=lambda n: ResNet(Bottleneck, [3, 4, 6, 3], n),
        classifier_key="fc.weight",
        input_size=(224, 224),
        channels=3,
        description="torchvision-compatible ResNet-50 (ImageNet stem)",
        defaults=_IMAGENET,
    )
)
register_arch(
    ArchSpec(
        name="resnet18-cifar",
        factory=lambda n: ResNet(BasicBlock, [2, 2, 2, 2], n, small_input=True),
        classifier_key="fc.weight",
        input_size=(32, 32),
        channels=3,
        description="ResNet-18 for 32x32 inputs (3x3 stem, no max-pool; torchvision names)",
    )
)
