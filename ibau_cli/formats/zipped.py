"""What kind of torch zip archive a file is (TorchScript or torch.save), by its member names."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import InputError


def zip_members(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def is_torchscript_zip(path: Path) -> bool:
    names = zip_members(path) or []
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def is_torch_save_zip(path: Path) -> bool:
    names = zip_members(path) or []
    return any(n.endswith("/data.pkl") for n in names) and not is_torchscript_zip(path)


def check_zip_integrity(path: Path, what: str) -> None:
    """Every member's CRC-32 as stored in the archive: torch's loaders do not check them, so a
    damaged TorchScript archive loaded, evaluated (near chance, blamed on the preprocessing) and,
    with --force, was "repaired" (a QA run flipped 200 bytes of one weight file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise InputError(
            f"{path}: not a readable {what} archive ({type(exc).__name__}: {exc})",
            hint="the file is truncated or damaged; download it again and check its size and sha256",
        ) from None
    if bad is not None:
        raise InputError(
            f"{path}: the {what} archive is damaged: member {bad} does not match its checksum (CRC-32)",
            hint="download it again and check its size and sha256",
        )
