"""Settings for the whole test run (tests/ and plugins/*/tests/).

`pytest -q` runs the tests in parallel workers (pytest-xdist, `-n auto` in pyproject.toml): on a
small CI machine the tests' tiny models use two cores poorly from one process, so two one-thread
workers finish sooner than one two-thread run. Each worker, and every `ibau` subprocess a test
starts, gets an equal share of the cores (OMP_NUM_THREADS, which ibau honours); `-n 0` runs
everything in one process with all of them.
"""

from __future__ import annotations

import os

MAX_WORKERS = 4  # each worker trains the session fixtures once; more workers repeat that work


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(_cores(), MAX_WORKERS))


def _share_the_cores() -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = str(max(1, _cores() // int(workers)))
    os.environ["OMP_NUM_THREADS"] = threads  # the ibau subprocesses the tests start
    os.environ["MKL_NUM_THREADS"] = threads
    import torch

    torch.set_num_threads(int(threads))


_share_the_cores()
