"""One `make shards` invocation: plan, lock the output, shard this partition's unfinished groups, merge.

Work is cut into groups (`shards.plan`), each written by a `GroupWriter` and committed by its record. That gives:
- determinism: a group's content depends only on its inputs and the config;
- resume: a restarted run skips finished groups; unfinished ones are rewritten from scratch, and a shard
  only gets its final name once complete (temp file + rename), so a reader never takes a partial file;
- partitions: job i of N takes the groups g with g % N == i; `merge=true` then writes the one manifest,
  identical to a single run's, from the group records.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional

from common import logs
from common.config import to_dict
from common.files import join
from shards.config import ShardsConfig
from shards.group_writer import GroupWriter
from shards.manifest import MANIFEST, REJECTS, ManifestWriter, check_shards
from shards.metrics import ShardsMetrics
from shards.output import Output, ShardsError
from shards.plan import PARTS, Group, Plan, fingerprint, plan
from shards.transcode import Job, Reject, Unavailable, process_local, read_input
from shards.validate import Rejected
from shards.workers import run_jobs

log = logging.getLogger(__name__)


@dataclass
class Work:
    """What this invocation did (earlier runs' groups are not counted): for the throughput line."""

    videos: int = 0
    source_seconds: float = 0.0
    cpu_seconds: float = 0.0  # in the workers' `process`
    rejected: int = 0


def run(cfg: ShardsConfig) -> Optional[dict]:
    """Shard this partition's groups; on a single-partition run, also write the manifest. Returns the summary
    (None for a partition job, and for `list_only`)."""
    t_start = time.time()
    logs.console()
    out = Output(cfg.output, cfg.retry_policy())
    part = cfg.partition
    owner = "merge" if cfg.merge else "list" if cfg.list_only else f"{part.index}-of-{part.count}"
    out.lock(owner)
    log_name = "shards.log" if owner == "0-of-1" else f"shards-{owner}.log"
    log_file = out.log_path(log_name)
    try:
        with logs.to_file(log_file):
            the_plan = plan(cfg, out)
            if cfg.list_only:
                log.info(f"{the_plan.num_inputs} inputs in {len(the_plan)} groups; start the partition jobs "
                         "(partition.index=i partition.count=N), then merge=true")
                return None
            return _run(cfg, out, the_plan, owner, t_start)
    finally:
        out.unlock()
        out.keep_log(log_file, log_name)


def _run(cfg: ShardsConfig, out: Output, the_plan: Plan, owner: str, t_start: float) -> Optional[dict]:
    work = Work()
    if not cfg.merge:
        part = cfg.partition
        # only this partition's groups are read from the listing
        mine = list(the_plan.groups(b for b, (_, g) in enumerate(the_plan.slots) if g % part.count == part.index))
        done = {g.name: rec for g in mine if (rec := _record(out, cfg, g)) is not None}
        damaged = _damaged(out, cfg, done)
        for name, problems in damaged.items():
            log.warning("group %s is damaged, rebuilding it: %s", name, "; ".join(problems))
            out.remove(f"{PARTS}/{name}.json")  # unfinished until rewritten
        todo = [g for g in mine if g.name not in done or g.name in damaged]
        work = _shard_groups(cfg, out, todo, done=len(mine) - len(todo), owner=owner)
        if part.count > 1:
            log.info(f"partition {part.index}/{part.count}: {len(mine)} groups done; "
                     f"run with merge=true once every partition has finished")
            return None
        del mine, todo, done
    return _merge(cfg, out, the_plan, work, time.time() - t_start)


def _record(out: Output, cfg: ShardsConfig, g: Group) -> Optional[dict]:
    """Group `g`'s record (its commit point) when it is finished, made from this run's inputs and settings."""
    if not out.exists(g.record):
        return None
    rec = out.read_json(g.record)
    if rec.get("fingerprint") != fingerprint(cfg, g):
        raise ShardsError(f"{out.url} holds group {g.name} made from other inputs or settings "
                          f"({g.record} does not match this run's config); write into a new output folder, "
                          "or delete the old one")
    return rec


def _damaged(out: Output, cfg: ShardsConfig, records: Dict[str, dict],
             hashes: Optional[bool] = None) -> Dict[str, List[str]]:
    """Group name -> what is wrong, for the finished groups (their records by name) whose shards or index files
    are missing or do not match the record (sizes, and sha256 with check_outputs=hash): a rerun rebuilds these."""
    owner = {sh["name"]: name for name, rec in records.items() for sh in rec["shards"]}
    shards = [sh for rec in records.values() for sh in rec["shards"]]
    bad: Dict[str, List[str]] = {}
    hashes = cfg.check_outputs == "hash" if hashes is None else hashes
    for shard, what in check_shards(out.fs, out.path, shards, hashes):
        bad.setdefault(owner[shard], []).append(f"shard {shard}: {what}")
    return bad


def _shard_groups(cfg: ShardsConfig, out: Output, todo: List[Group], done: int, owner: str) -> Work:
    work = Work()
    if not todo:
        return work
    tmpdir = out.tmpdir(owner)
    writers = {g.name: GroupWriter(g, out, cfg, tmpdir) for g in todo}
    jobs, early, retry = [], [], out.retry
    for g in todo:
        for pos, (s, key, label_index) in enumerate(zip(g.sources, g.keys, g.label_index)):
            job = Job(key, s.url, s.label, label_index, cfg.transcode, cfg.filter, cfg.kind, cfg.image, retry)
            if process_local(s.url):  # memory://: only this process sees it; the worker gets its bytes
                try:
                    job.data = read_input(s.url, cfg.filter, retry)
                except Rejected as r:
                    early.append(((g.name, pos), Reject(key, s.url, r.reason, r.detail)))
                    continue
            jobs.append(((g.name, pos), job))
    workers = cfg.workers or os.cpu_count() or 1
    bar = logs.Progress(len(jobs) + len(early), f"shards ({done} groups already done)" if done else "shards", cfg.kind,
                        enabled=cfg.progress, logger=log)
    stats = ShardsMetrics(cfg.metrics_port, run=posixpath.basename(out.path.rstrip("/")), videos=len(jobs) + len(early),
                          groups=len(todo))

    def on_result(tag, result) -> None:
        gname, pos = tag
        if isinstance(result, Unavailable):  # storage trouble, not the video's: never a permanent reject
            raise ShardsError(f"input {result.source} could not be read: {result.detail}. Finished groups are "
                              "kept: run the same command again to resume")
        work.videos += 1
        work.cpu_seconds += result.seconds
        if isinstance(result, Reject):
            work.rejected += 1
            stats.reject(result.reason)
        else:
            work.source_seconds += result.meta["source_duration"]
            stats.sample(result.meta["source_duration"], len(result.video))
        bar.update(1, note=f"{work.rejected} rejected" if work.rejected else "")
        if writers[gname].add(pos, result):
            writers.pop(gname).finish()
            stats.group()

    try:
        for tag, result in early:
            on_result(tag, result)
        run_jobs(jobs, workers, on_result)
    finally:
        bar.close()
        stats.close()
        shutil.rmtree(tmpdir, ignore_errors=True)  # holds nothing with a final name; local or not
    return work


MERGE_THREADS = 8  # group records read in parallel by the merge (storage latency, not CPU)


def _merge(cfg: ShardsConfig, out: Output, the_plan: Plan, work: Work, wall: float) -> dict:
    """Write the manifest from the group records, streamed: groups are read from the listing and their records
    a window at a time on threads, their rows written shard by shard (`ManifestWriter`), so memory is O(window of
    records + shards), not O(rows). The shards of each record are checked against it (sizes; sha256 only with
    `rehash=true`: the hashes recorded at each group's commit are trusted otherwise). Nothing is published
    unless every group is finished and intact."""
    done = set(out.list_names(PARTS))  # one listing, not a request per group
    missing = [the_plan.name(b) for b in range(len(the_plan)) if f"{the_plan.name(b)}.json" not in done]
    rehash = cfg.merge and cfg.rehash
    if missing:
        _refuse(out, missing, [])
    writer = ManifestWriter(out.url)
    shards, rejects, damaged = [], [], []
    source_seconds, hours, splits = 0.0, 0.0, Counter()
    window = 4 * MERGE_THREADS
    try:
        with ThreadPoolExecutor(MERGE_THREADS) as pool:
            for at in range(0, len(the_plan), window):
                groups = list(the_plan.groups(range(at, min(at + window, len(the_plan)))))
                for g, rec in zip(groups, pool.map(lambda g: _record(out, cfg, g), groups)):
                    if rec is None:  # removed since the listing
                        missing.append(g.name)
                        continue
                    if cfg.merge:
                        damaged += list(_damaged(out, cfg, {g.name: rec}, hashes=rehash))
                    if missing or damaged:
                        continue
                    writer.add(rec["shards"], rec["samples"])
                    shards += rec["shards"]
                    rejects += rec["rejects"]
                    source_seconds += rec["source_seconds"]
                    hours += sum(r["duration"] for r in rec["samples"])
                    splits.update(r["split"] for r in rec["samples"])
        if missing or damaged:
            _refuse(out, missing, damaged)
        classes = [n for n, _ in sorted(the_plan.labels.items(), key=lambda kv: kv[1])]
        summary = {
            "videos_in": the_plan.num_inputs,
            "sharded": writer.num_rows,
            "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "hours": round(hours / 3600, 4),
            "source_hours": round(source_seconds / 3600, 4),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": len(shards),
            "splits": dict(sorted(splits.items())),
        }
        meta = {"created_by": "tubelet make_shards", "kind": cfg.kind, "classes": classes, "summary": summary,
                "config": {k: v for k, v in to_dict(cfg).items() if k not in ("workers", "progress", "merge",
                                                                               "partition", "metrics_port", "list_only",
                                                                               "check_outputs", "retries",
                                                                               "retry_backoff_s", "rehash")}}
    except BaseException:
        writer.abort()
        raise
    out.retry.call(lambda: writer.close(rejects, meta), f"writing the manifest of {out.url}")
    speed = {"wall_seconds": round(wall, 2), "videos_processed": work.videos,
             "worker_cpu_seconds": round(work.cpu_seconds, 2),
             "videos_per_second": round(work.videos / wall, 2) if wall > 0 else None,
             "source_seconds_per_cpu_second": round(work.source_seconds / work.cpu_seconds, 2)
             if work.cpu_seconds else None}
    log.info(_summary_text(out.url, summary, speed, cfg.kind))
    if not writer.num_rows:
        raise ShardsError(f"no input was sharded: all {summary['videos_in']} were rejected "
                          f"({', '.join(f'{k}: {v}' for k, v in summary['rejected'].items())}); the reasons are in "
                          f"{join(out.url, REJECTS)}")
    return dict(summary, **speed)


def _refuse(out: Output, missing: List[str], damaged: List[str]) -> None:
    def some(names: List[str]) -> str:
        return f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"

    what = [f"{len(missing)} groups are not finished {some(missing)}"] if missing else []
    what += [f"{len(damaged)} groups are damaged {some(damaged)}"] if damaged else []
    raise ShardsError(f"cannot write the manifest of {out.url}: {' and '.join(what)}; run the partitions that "
                      "own them (group % partition.count == partition.index)")


def _summary_text(url: str, s: dict, speed: dict, kind: str = "video") -> str:
    """The end of a run, in the words of what was sharded (videos, or images: no hours, no source-seconds)."""
    rej = ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "none"
    items = f"{kind}s"
    rate = (f"{speed['source_seconds_per_cpu_second']} source-seconds per worker CPU-second" if kind == "video" else
            f"{round(speed['videos_processed'] / speed['worker_cpu_seconds'], 1) if speed['worker_cpu_seconds'] else '-'}"
            " images per worker CPU-second")
    done = (f"{speed['videos_processed']} {items} in {speed['wall_seconds']} s, {speed['videos_per_second']} "
            f"{items}/s, {rate}"
            if speed["videos_processed"] else f"nothing to do: every group was already finished "
                                              f"({speed['wall_seconds']} s to check)")
    return (f"\n{url}/{MANIFEST}\n"
            f"  {items + ' in':<14} {s['videos_in']}\n"
            f"  sharded        {s['sharded']}  ({', '.join(f'{k}: {v}' for k, v in s['splits'].items())})\n"
            f"  rejected       {sum(s['rejected'].values())}  ({rej}; see {REJECTS})\n"
            + (f"  video hours    {s['hours']:.3f}\n" if kind == "video" else "")
            + f"  bytes written  {s['bytes']:,} in {s['shards']} shards\n"
            f"  this run       {done}")
