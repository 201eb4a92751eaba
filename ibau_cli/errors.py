"""The one error hierarchy. Only the CLI turns these into output and an exit code."""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM, 128 + 15 as shells report it


class IbauError(Exception):
    """Base error: a one-line message for the user and an exit code."""

    exit_code = EXIT_RUNTIME
    category = "runtime"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint.rstrip('.')}"
        return " ".join(text.split("\n"))


class UsageError(IbauError):
    """Bad flags or options."""

    exit_code = EXIT_BAD_INPUT
    category = "usage"


class InputError(IbauError):
    """A bad input file or folder (model, clean data, trigger, config)."""

    exit_code = EXIT_BAD_INPUT
    category = "input"


class ConfigError(InputError):
    """An invalid configuration key or value."""

    category = "config"


class ModelMismatchError(InputError):
    """The model and the data or preprocessing do not fit each other."""

    category = "model"


class RuntimeFailure(IbauError):
    """Something failed while running (device, numerics, writing output)."""

    exit_code = EXIT_RUNTIME
    category = "runtime"


class PluginError(InputError):
    """A plugin could not be loaded (missing file, import error, registration clash)."""

    category = "plugin"


def first_line(exc: BaseException) -> str:
    """An exception's message in one line. TorchScript errors carry a whole traceback whose last
    "SomeError: ..." line is the cause; others are cut to their first line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    text = causes[-1] if causes else (lines[0] if lines else type(exc).__name__)
    return text[:300]


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's MemoryError, torch's CPU allocator
    ("can't allocate memory") or a CUDA out-of-memory error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def out_of_memory_size(exc: BaseException) -> str:
    """`` (an allocation of 120.0 GB)`` from an allocator's message that gives the size, else ``""``."""
    m = re.search(r"(?:tried to allocate|allocate) (\d+(?:\.\d+)?) ?(bytes|B|KiB|MiB|GiB|TiB)", str(exc))
    if not m:
        return ""
    scale = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[m.group(2)]
    size = float(m.group(1)) * scale
    said = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    return f" (an allocation of {said} failed)"
