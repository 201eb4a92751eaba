"""What kind of torch zip archive a file is (TorchScript or torch.save), by its member names."""

from __future__ import annotations

import zipfile
from pathlib import Path


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
