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
    """The CPUs this run may use: its affinity mask, lowered to a container's CPU quota (ibau's own
    reading of it), so a `docker run --cpus 2` on a large host is not given a worker per host core."""
    from ibau_cli.device import cgroup_cpu_limit

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(_cores(), MAX_WORKERS))


def _share_the_cores() -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = max(1, _cores() // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ibau subprocesses the tests start
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_the_cores()


TRAINED_FIXTURES = ("backdoored", "demo_zoo")  # tests/conftest.py: trained once per run, shared by the workers


def pytest_collection_modifyitems(config, items) -> None:
    """The tests marked slow (about 30 s to 2 min each, on real zoo models or whole CLI runs) run
    first: the parallel workers then end on short tests and finish together, instead of one worker
    starting a two-minute test while the other has nothing left to do. Among them, those that need
    no model trained by the session fixtures come first, so one worker trains those models while the
    other runs a zoo test instead of waiting for them. Pair with `--dist load --maxschedchunk 1`
    (pyproject.toml), which hands the tests out in this order, a couple at a time (not half the
    collection to each worker up front, as worksteal does)."""

    def key(item) -> tuple[bool, bool]:
        trained = any(name in TRAINED_FIXTURES for name in getattr(item, "fixturenames", ()))
        return item.get_closest_marker("slow") is None, trained

    items.sort(key=key)  # stable: file order otherwise
