"""Reporters turn a report into text; only the CLI decides where the text goes.

``REPORT_FORMATS`` maps a format name to its renderer; ``format_for_path`` picks one from a file name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .html_report import render_html
from .json_report import render_json
from .junit import render_junit
from .sarif import render_sarif

Renderer = Callable[[dict[str, Any], dict[str, bytes]], str]

REPORT_FORMATS: dict[str, Renderer] = {
    "json": lambda report, images: render_json(report),
    "sarif": lambda report, images: render_sarif(report),
    "junit": lambda report, images: render_junit(report),
    "html": render_html,
}

SUFFIXES = {".json": "json", ".sarif": "sarif", ".xml": "junit", ".html": "html", ".htm": "html"}


def format_for_path(path: Path) -> str:
    """The report format a file name asks for: .json, .sarif (or .sarif.json), .xml (JUnit), .html."""
    name = Path(path).name.lower()
    if name.endswith(".sarif.json"):
        return "sarif"
    fmt = SUFFIXES.get(Path(name).suffix)
    if fmt is None:
        raise UsageError(
            f"--report {path}: cannot tell the report format from the file name",
            hint="end it in .json, .sarif, .xml (JUnit) or .html",
        )
    return fmt


def render(fmt: str, report: dict[str, Any], images: dict[str, bytes] | None = None) -> str:
    return REPORT_FORMATS[fmt](report, images or {})


__all__ = ["REPORT_FORMATS", "format_for_path", "render"]
