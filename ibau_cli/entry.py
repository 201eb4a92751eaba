"""The ``ibau`` console script: Ctrl-C and SIGTERM are answered from the first moment.

Importing the command line (click, rich) takes a tenth of a second or more, and a signal in that
window printed a KeyboardInterrupt traceback (a QA run signalled 0.05-0.15 s after the start).
This module imports nothing heavy: until ``cli.run`` installs its own handling, a signal ends the
process at once with the documented code (nothing has been written yet)."""

from __future__ import annotations

import os
import signal
import sys

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED  # errors imports nothing heavy


def _during_start_up(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n" if signum == signal.SIGINT else b"terminated\n")
    os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED)


def main() -> None:
    # a signal the parent had ignored (nohup, a background job of a script) stays ignored
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    for sig in watched:
        signal.signal(sig, _during_start_up)
    from .cli import run  # click, rich: the slow part of start-up

    if _runs_a_command(sys.argv[1:]):
        # torch (1-3 s) and numpy, which it imports, still inside this window: torch's C start-up
        # imports numpy and swallows any error from it, a KeyboardInterrupt included, so a Ctrl-C
        # there left numpy half-imported and the run going on, to fail later with exit 3 (a QA
        # run signalled 0.2-1.1 s after the start)
        import numpy  # noqa: F401
        import torch  # noqa: F401

    if signal.SIGINT in watched:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises again; run() maps it to 130
    run(sys.argv[1:])


def _runs_a_command(args: list[str]) -> bool:
    """Whether these arguments run a command (which imports torch) rather than print help, the
    version or shell completions (which should stay quick)."""
    if not args or os.environ.get("_IBAU_COMPLETE"):
        return False
    return not ({"--help", "-h", "--version"} & set(args))


if __name__ == "__main__":  # pragma: no cover
    main()
