"""Output files that an interrupt cannot leave half-made or stray.

Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` in the main thread (``cli.run``). A temporary file
made just before a signal, or a rename done just before one, must still be recorded so that the
clean-up can remove it: ``hold_signals`` defers both signals around such steps. The command line
also tracks the output files a run creates (``track_created_files``) and removes them when the run
is interrupted before its outcome is decided (``remove_created_files``)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path


def make_temp_file(folder: Path, made: list[Path], *, prefix: str, suffix: str = "") -> Path:
    """``tempfile.mkstemp`` in ``folder``, its path appended to ``made`` before Ctrl-C or SIGTERM can
    interrupt (both are held meanwhile): a signal landing between a file's creation and the caller's
    clean-up left hidden ``.tmp`` files behind (a QA run signalled as each one appeared). Call it
    inside the ``try`` whose handler removes what ``made`` holds; a held signal arrives after."""
    held = hold_signals()
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        os.close(fd)
        made.append(Path(name))
        return made[-1]
    finally:
        release_signals(held)


_created: list[Path] | None = None  # files this run created; None: not tracked (the library API)


def track_created_files() -> None:
    """From now on, remember every output file ``write_atomically`` creates (not ones it replaces):
    the command line removes them when Ctrl-C or SIGTERM ends the run before its outcome is decided,
    so a cancelled run leaves no model (unverified, say) without its reports."""
    global _created
    _created = []


def stop_tracking_created_files() -> None:
    """The run is over: later writes in this process (a library caller's, a test's) are not its outputs."""
    global _created
    _created = None


def note_created(path: Path) -> None:
    if _created is not None:
        _created.append(path)


def remove_created_files() -> list[Path]:
    """Remove the files this run created (tracking on), returning those removed."""
    removed = []
    for path in _created or []:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    if _created is not None:
        _created.clear()
    return removed


def hold_signals() -> dict | None:
    """Defer Ctrl-C and SIGTERM (until ``release_signals``), where a step and its record must not part.
    Python runs signal handlers in the main thread between bytecodes, whichever thread the signal hit
    (torch's threads do not block it), so blocking the signal (pthread_sigmask) is not enough: the
    handlers are swapped for one that notes the signal, and ``release_signals`` raises it again.
    Outside the main thread (a library caller's worker) nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if any(signal.getsignal(sig) is None for sig in (signal.SIGINT, signal.SIGTERM)):
        return None  # a handler installed from C: it could not be put back
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    return {"previous": previous, "pending": pending}


def release_signals(held: dict | None) -> None:
    """Put the handlers back, then raise again the first signal that came meanwhile."""
    if held is None:
        return
    for sig, handler in held["previous"].items():
        signal.signal(sig, handler)
    if held["pending"]:
        signal.raise_signal(held["pending"][0])
