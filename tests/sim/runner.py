"""Runs many simulation seeds, in this process or in a small process pool.

Used by the command line (`python -m tests.sim`) and by the default test run.
Seeds are independent, so they are split across `jobs` worker processes in
chunks; results come back in seed order. Imports the simulation only; starts
processes only when `jobs > 1` and always joins them before returning.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence

from .cluster import SeedResult, SimOptions, run_seed

# Seeds per cluster size in the default test run.
DEFAULT_SEEDS = 1000


def _run_one(args: tuple[int, int, SimOptions | None]) -> SeedResult:
    seed, size, options = args
    return run_seed(seed, size, options)


def run_seeds(
    seeds: Sequence[int],
    size: int,
    *,
    jobs: int = 1,
    options: SimOptions | None = None,
    stop_when: Callable[[SeedResult], bool] | None = None,
) -> list[SeedResult]:
    """Results of the seeds that ran, in seed order. The list ends at the first
    result for which `stop_when` is true (later seeds may have run in parallel,
    their results are dropped). Worker processes are spawned, not forked:
    forking a test process whose other threads (trio's worker-thread cache,
    for one) hold a lock deadlocks the child. So a monkeypatch applied before
    the call is NOT in effect in workers: patched runs use `jobs=1`."""
    work = [(seed, size, options) for seed in seeds]
    results: list[SeedResult] = []
    if jobs <= 1:
        for item in work:
            result = _run_one(item)
            results.append(result)
            if stop_when is not None and stop_when(result):
                break
        return results
    chunk = max(1, min(25, len(work) // (jobs * 8)))
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for result in pool.imap(_run_one, work, chunksize=chunk):
            results.append(result)
            if stop_when is not None and stop_when(result):
                break
    return results
