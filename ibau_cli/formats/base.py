"""The format interface: sniff a file, load a model from it, save a model to it."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from ..errors import RuntimeFailure
from ..preprocess import Preprocess


@dataclass
class LoadedModel:
    """A model ready to run, with what is known about it."""

    module: nn.Module
    fmt: str
    num_classes: int
    arch: str | None = None
    preprocess: Preprocess | None = None  # from the file's own metadata, when it has some
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_hint: tuple[int, int, int] | None = None  # (channels, height, width) when the file says
    reference: Callable[[np.ndarray], np.ndarray] | None = None  # an independent runtime, if any
    # state-dict keys stored in another floating dtype than the module computes in (fp16, bf16,
    # fp64 files): the repaired weights are rounded to it and written in it
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveRequest:
    arch: str | None
    num_classes: int
    preprocess: Preprocess
    extra_metadata: dict[str, str] = field(default_factory=dict)
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # written back in these dtypes


def state_dict_as_stored(module: nn.Module, request: SaveRequest) -> dict[str, torch.Tensor]:
    """The module's state dict on the CPU, each tensor in the dtype the input file stored it in."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        dtype = request.stored_dtypes.get(k)
        out[k] = (v.to(dtype) if dtype is not None else v).contiguous().clone()
    return out


class ModelFormat(ABC):
    """One checkpoint format. Subclasses register themselves in ``FORMATS``."""

    name: str = ""
    suffixes: tuple[str, ...] = ()
    carries_graph: bool = False  # the file holds the network itself (no --arch needed, none accepted)

    @abstractmethod
    def sniff(self, head: bytes, path: Path) -> bool:
        """True when the first bytes of the file look like this format."""

    @abstractmethod
    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel: ...

    save_from: tuple[str, ...] | None = None  # the source formats it can write from; None: any

    def can_save_from(self, source_format: str) -> bool:
        """Whether a model loaded from ``source_format`` can be written in this format."""
        return self.save_from is None or source_format in self.save_from

    def check_can_save(self, module: nn.Module, path: Path) -> None:
        """Raise a UsageError, before any work, when ``module`` cannot be written in this format."""
        return None  # most formats write any module their can_save_from accepts

    @abstractmethod
    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        """Write ``module`` to ``path`` (the caller makes it atomic)."""


def fixed_batches(total: int, size: int) -> Iterator[tuple[list[int], int]]:
    """Index lists of ``size`` covering ``range(total)`` in order, the last one padded by repeating its
    last index, each with how many of its entries are real: the batches a graph exported with a
    fixed batch size runs on (torch tensors and numpy arrays both take the index list)."""
    for start in range(0, total, size):
        real = min(size, total - start)
        yield [start + min(i, real - 1) for i in range(size)], real


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0)  # read once, at import, before any thread of the caller's can create files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not path.parent.exists():
        # every destination is checked before any work: a folder missing now went away during the run
        raise RuntimeFailure(
            f"cannot write {path}: its folder {path.parent} no longer exists (removed during the run?)",
            hint="keep the output folder in place until ibau exits, and rerun",
        )
    from ..interrupts import hold_signals, make_temp_file, note_created, release_signals

    existed = path.exists()
    made: list[Path] = []
    try:
        # hidden, marked .tmp, and ending in the real extension (writers such as torch.export check it)
        tmp = make_temp_file(path.parent, made, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        held = hold_signals()  # the rename and its record, so that an interrupted run can remove it
        try:
            os.replace(tmp, path)
            if not existed:
                note_created(path)
        finally:
            release_signals(held)
    except BaseException as exc:
        for leftover in made:
            leftover.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RuntimeFailure(f"cannot write {path} ({exc.strerror or exc})") from exc
        raise


def utf8_path(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (Python keeps other bytes in a name as surrogate escapes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def opened(path: Path, mode: str) -> Iterator[str | BinaryIO]:
    """``str(path)`` for a UTF-8 path, else the file opened in ``mode``: the C++ file handling of
    torch and safetensors takes UTF-8 names only (a QA run's Latin-1 name failed after the repair),
    while every torch reader and writer ibau calls also takes a file object."""
    if utf8_path(path):
        yield str(path)
        return
    with open(path, mode) as fh:
        yield fh
