"""Jobs in processes of their own, a few at a time, within a time budget: the recipe search's scheduler. A job that
raises reports an error row; one whose process dies without a result (killed, crashed) gets one, never a hang."""

from __future__ import annotations

import multiprocessing as mp
import time
from queue import Empty
from typing import Callable, Dict, List


def job_main(run: Callable[[dict], dict], job: dict, queue) -> None:
    """A job's process: its row, or an error row when it raised (never a hang)."""
    try:
        queue.put(run(job))
    except BaseException as e:  # report, never hang the sweep
        queue.put({"name": job["name"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}"})


def next_result(queue, running: dict, poll: float = 10.0) -> dict:
    """The next finished job's row; a job process that died without one (killed, crashed) gets an error row."""
    while True:
        try:
            return queue.get(timeout=poll)
        except Empty:
            dead = [key for key, p in running.items() if not p.is_alive()]
            if dead:
                try:
                    return queue.get(timeout=poll)  # it may have reported just before exiting
                except Empty:
                    name, seed = dead[0]
                    return {"name": name, "seed": seed,
                            "error": f"job process died without a result (exit code {running[dead[0]].exitcode})"}


def schedule(run: Callable[[dict], dict], jobs: List[dict], workers: int, budget: float, t0: float,
             running: Dict, on_row: Callable[[dict], None]) -> None:
    """`run(job)` for each job (popped from `jobs`) in a process of its own, `workers` at a time, none started
    once `budget` seconds have passed since `t0`; `on_row(row)` as each finishes (an error row for one that
    raised or died). `running`: (name, seed) -> process, the caller's, so it can kill them."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    while jobs or running:
        while jobs and len(running) < workers and time.time() - t0 < budget:
            job = jobs.pop(0)
            p = ctx.Process(target=job_main, args=(run, job, queue))
            p.start()
            running[(job["name"], job["seed"])] = p
        if not running:
            break
        r = next_result(queue, running)
        running.pop((r["name"], r["seed"])).join()
        on_row(r)
