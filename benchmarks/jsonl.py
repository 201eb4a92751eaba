"""JSON-lines results files: every benchmark appends one row per finished measurement and reads the
file back to skip what is done, so a killed run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    """Append one row; a killed run loses at most the row it was computing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def row_version(row: dict) -> str:
    """The ibau version that produced a row (rows from before versions were recorded: 0.1.0).
    Defaults change between versions, so a row counts as done, or is tabled, per version."""
    return row.get("tool_version", "0.1.0")
