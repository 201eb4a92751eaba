"""ibau: find and remove backdoors in image classifiers with I-BAU, and gate on the result.

    from ibau_cli import sanitize, scan
    report = sanitize("model.safetensors", "clean/", out="fixed.safetensors", max_asr=0.05)

The library API never prints, exits or imports click/rich (see ``ibau_cli.api``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.4.6"
__all__ = ["__version__", "sanitize", "scan"]

if TYPE_CHECKING:
    from .api import sanitize, scan


def __getattr__(name: str) -> Any:  # torch is imported on first use, not by `import ibau_cli`
    if name in ("sanitize", "scan"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ibau_cli' has no attribute {name!r}")
