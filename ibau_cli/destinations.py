"""Checks on where ibau will write (the repaired model, reports, artifacts), made before any work:
every destination writable, none of them the input model, no two of them the same file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import UsageError
from .interrupts import make_temp_file

_SPECIAL = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_destination(path: Path, what: str) -> None:
    """An output path that exists must be a regular file: ibau writes by renaming a finished file
    over it, which would replace a device such as /dev/null (as root, the system's) or a pipe."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # not there (or not reachable): the folder checks say what is wrong
    for test, kind in _SPECIAL:
        if test(mode):
            raise UsageError(
                f"{what} {path} is {kind}, not a regular file: ibau writes by replacing the file, which would "
                "replace it",
                hint="give the path of a regular file (to discard an output, write it to a temporary folder)",
            )


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_folder(folder: Path, what: str) -> None:
    """Create and remove a scratch file in ``folder``: the only test that holds for every user and
    file system (root passes permission checks, /proc and read-only mounts do not take new files)."""
    made: list[Path] = []
    try:
        os.unlink(make_temp_file(folder, made, prefix=".ibau-write-check-"))
    except OSError as e:
        raise UsageError(
            f"{what}: folder {folder} does not take a new file (creating one failed: {e.strerror or e})",
            hint="choose a writable location",
        ) from None
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise


def check_artifacts_folder(path: Path, flag: str = "--artifacts") -> None:
    """``--artifacts`` (or ``demo --dir``): a folder (created if missing) whose nearest existing
    ancestor takes files."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder (created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, so the folder cannot be created")
    check_writable_folder(existing, f"{flag} {path}")


def check_outside(folder: Path, data: Path, flag: str, data_flag: str, *, is_file: bool = False) -> None:
    """An output (a folder, or with ``is_file`` a file) may not be, or lie inside, an input folder:
    artifacts, a repaired model or a report written into the clean folder made the next run on it
    fail (files at its top, or a class folder that is not a class). A file is replaced, not written
    through, so its own name is not resolved (a link in the clean folder pointing outside is inside)."""
    try:
        where = folder.parent.resolve() / folder.name if is_file else folder.resolve()
        inside = where == data.resolve() or data.resolve() in where.parents
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return
    if inside:
        raise UsageError(
            f"{flag} {folder} is inside {data_flag} {data}: its files would become part of that input",
            hint=f"give {flag} a folder outside {data}",
        )


def check_distinct(
    model: Path,
    out: Path | None,
    reports: Iterable[Path],
    *,
    inputs: dict[str, Path] | None = None,
    artifacts: Path | None = None,
) -> None:
    """No report may overwrite the input model, another input file (``inputs``: flag -> path), the
    repaired model or another report; the artifacts folder may be none of these files."""
    reports = list(reports)
    for report in reports:
        for flag, path in (inputs or {}).items():
            if same_file(report, path):
                raise UsageError(
                    f"--report {report} is the {flag} file; ibau never modifies its inputs",
                    hint="choose another report path",
                )
    if artifacts is not None:
        for what, path in [("--out", out), *(("--report", r) for r in reports)]:
            if path is not None and same_file(artifacts, path):
                raise UsageError(
                    f"--artifacts {artifacts} is also the {what} path: a folder cannot be that file",
                    hint="give the artifacts their own folder",
                )
    seen: list[Path] = []
    for report in reports:
        if same_file(report, model):
            raise UsageError(
                f"--report {report} is the input model; ibau never modifies its input",
                hint="choose another report path",
            )
        if out is not None and same_file(report, out):
            raise UsageError(
                f"--report {report} is also the --out path: the report would replace the repaired model",
                hint="give the report its own file name",
            )
        if any(same_file(report, other) for other in seen):
            raise UsageError(f"--report {report} is given twice", hint="give each report its own file name")
        seen.append(report)
