"""Running transcode jobs on a pool of worker processes, crash-isolated.

A worker that dies (a decoder segfault, the OOM killer) costs one video, never the run: the jobs in flight are
retried one at a time, and the one that kills its worker again is rejected as `decoder_crash`.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, Sequence, Tuple

from shards.transcode import Job, Reject, process


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn: workers start clean (no inherited threads or locks from the parent's libraries)
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_die_with_parent,
                                  initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """Worker initializer: when the parent is killed (kill -9), its workers exit instead of idling forever."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_jobs(jobs: Sequence[Tuple[object, Job]], workers: int, on_result) -> None:
    """Process `jobs` on `workers` processes; call `on_result(tag, result)` in the parent as they finish.

    A worker that dies (a decoder segfault, the OOM killer) breaks the pool; the jobs in flight are then
    retried one at a time, and the one that kills its worker again is rejected as `decoder_crash`.
    """
    pending = deque(jobs)
    suspects: deque = deque()
    window = max(2, 2 * workers)
    pool = _pool(workers)
    try:
        while pending or suspects:
            if suspects:  # isolate: one job alone, so a crash is attributable
                tag, job = suspects.popleft()
                try:
                    on_result(tag, pool.submit(process, job).result())
                except BrokenProcessPool:
                    pool.shutdown(cancel_futures=True)
                    pool = _pool(workers)
                    on_result(tag, Reject(job.key, job.url, "decoder_crash",
                                          "the worker process died while decoding this video"))
                continue
            inflight: Dict[cf.Future, Tuple[object, Job]] = {}
            try:
                while pending or inflight:
                    while pending and len(inflight) < window:
                        tag, job = pending.popleft()
                        inflight[pool.submit(process, job)] = (tag, job)
                    done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        result = fut.result()  # BrokenProcessPool: fut stays in flight, so it is retried
                        tag, job = inflight.pop(fut)
                        on_result(tag, result)
            except BrokenProcessPool:
                suspects.extend(inflight.values())
                pool.shutdown(cancel_futures=True)
                pool = _pool(workers)
    finally:
        pool.shutdown(cancel_futures=True)
