"""The run lock under a crowd (issue 24, class 1): 40 processes taking it at the same instant,
on a fresh folder and over the lock of a process that died holding it, never both hold it."""

import multiprocessing as mp
import os

import pytest

from furlib.training.runlock import RunLock

WORKERS, TRIALS = 40, 30


def _worker(folders, start, tried, results):
    """For each trial: wait for all, try the lock, report, wait until all have tried, release."""
    for folder in folders:
        start.wait()
        lock = RunLock(folder)
        try:
            lock.acquire()
            results.put((folder, os.getpid(), lock.note))
        except RuntimeError as err:
            results.put((folder, None, str(err)))
        tried.wait()
        lock.release()


def _die_holding(folder):
    RunLock(folder).acquire()
    os._exit(0)  # no release: the crash a stale lock comes from


def _crowd(folders):
    ctx = mp.get_context("fork")
    start, tried, results = ctx.Barrier(WORKERS), ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(folders, start, tried, results)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(WORKERS * len(folders))]
    for p in procs:
        p.join(timeout=60)
    return {f: [(pid, text) for g, pid, text in got if g == f] for f in folders}


@pytest.mark.parametrize("over_dead", [False, True], ids=["fresh", "over_dead_holder"])
def test_forty_at_once_never_two_holders(tmp_path, over_dead):
    folders = [str(tmp_path / f"run{i}") for i in range(TRIALS)]
    if over_dead:
        for folder in folders:
            p = mp.get_context("fork").Process(target=_die_holding, args=(folder,))
            p.start()
            p.join()
    by_folder = _crowd(folders)
    for folder, outcomes in by_folder.items():
        holders = [text for pid, text in outcomes if pid is not None]
        assert len(outcomes) == WORKERS
        assert len(holders) == 1, f"{folder}: {len(holders)} processes held the lock at once"
        refused = [text for pid, text in outcomes if pid is None]
        assert all("is in use by process" in text for text in refused), refused[:2]
        if over_dead:
            assert "took over the stale lock" in holders[0]
