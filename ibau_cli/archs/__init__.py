"""Built-in architectures behind a small registry that plugins extend.

Each entry is an :class:`ArchSpec`: a factory taking ``num_classes``, the state-dict key of the
final layer's weight (its first dimension is the number of classes), and default preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class ArchSpec:
    name: str
    factory: Callable[[int], nn.Module]
    classifier_key: str
    # None: not declared; ibau then reads the channels from the model's first convolution and the
    # size from the clean images when they all share one (input_shape.py), else 3 x 32 x 32
    input_size: tuple[int, int] | None = None
    channels: int | None = None
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def build(self, num_classes: int) -> nn.Module:
        return self.factory(num_classes)


ARCHS: Registry[ArchSpec] = Registry("architecture")


def register_arch(spec: ArchSpec, *, origin: str | None = None) -> ArchSpec:
    """Register an architecture (used by the built-ins and by plugins)."""
    return ARCHS.register(spec.name, spec, origin=origin)


def _load_builtins() -> None:
    from . import preact_resnet, resnet, small_cnn, vgg  # noqa: F401


_load_builtins()
