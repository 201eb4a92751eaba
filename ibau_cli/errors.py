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
