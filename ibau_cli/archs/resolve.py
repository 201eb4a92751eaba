"""Turn an ``--arch`` value into a model: a registry name or ``path/to/file.py:Factory``."""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..user_code import import_file
from . import ARCHS, ArchSpec


def is_user_code(arch: str) -> bool:
    return ":" in arch and arch.rsplit(":", 1)[0].endswith(".py")


def builtin_spec(arch: str) -> ArchSpec:
    spec = ARCHS.get(arch)
    if spec is None:
        raise InputError(
            f"unknown architecture {arch!r}",
            hint=f"use one of {', '.join(ARCHS.names())}, --arch path/to/file.py:ClassOrFactory, or load "
            "the plugin that registers it (ibau --plugin FILE, or install it; `ibau plugins` lists what is loaded)",
        )
    return spec


def build_user_model(arch: str, num_classes: int | None) -> nn.Module:
    """Import the user's file and call the class or factory (with ``num_classes`` if it takes it;
    when it requires one and ``num_classes`` is None, with 1: a placeholder the caller rebuilds
    from, once the file's classifier says the real count)."""
    file_part, _, attr = arch.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise InputError(f"--arch {arch}: file not found: {path}")
    try:
        module = import_file(path, "ibau_user_arch")
    except (Exception, SystemExit) as exc:  # anything; a sys.exit() must not end ibau with its code
        raise InputError(f"--arch {arch}: importing {path} failed ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"--arch {arch}: {path} has no class or function named {attr!r}")
    if not callable(factory):
        raise InputError(f"--arch {arch}: {attr!r} in {path} is a {type(factory).__name__}, not a class or function")
    kwargs = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        elif params["num_classes"].default is inspect.Parameter.empty:
            kwargs["num_classes"] = 1
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as exc:
        raise InputError(
            f"--arch {arch}: calling {attr}({', '.join(kwargs)}) failed ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
