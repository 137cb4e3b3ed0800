"""One `make shards` invocation: plan, lock the output, shard this partition's unfinished groups, merge.

Work is cut into groups (`shards.plan`), each written by a `GroupWriter` and committed by its record. That gives:
- determinism: a group's content depends only on its inputs and the config;
- resume: a restarted run skips finished groups; unfinished ones are rewritten from scratch, and a shard
  only gets its final name once complete (temp file + rename), so a reader never takes a partial file;
- partitions: job i of N takes the groups g with g % N == i; `merge=true` then writes the one manifest,
  identical to a single run's, from the group records.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

from tqdm import tqdm

from common.config import to_dict
from shards.config import ShardsConfig
from shards.group_writer import GroupWriter
from shards.manifest import MANIFEST, write_manifest
from shards.metrics import ShardsMetrics
from shards.output import Output, ShardsError
from shards.plan import Group, fingerprint, plan
from shards.transcode import Job, Reject
from shards.workers import run_jobs


def run(cfg: ShardsConfig) -> Optional[dict]:
    """Shard this partition's groups; on a single-partition run, also write the manifest. Returns the summary."""
    t_start = time.time()
    cpu_start = time.process_time()
    groups, labels = plan(cfg)
    out = Output(cfg.output)
    part = cfg.partition
    owner = "merge" if cfg.merge else f"{part.index}-of-{part.count}"
    out.lock(owner)
    try:
        if not cfg.merge:
            mine = [g for g in groups if g.index % part.count == part.index] if part.count > 1 else groups
            todo = [g for g in mine if not _finished(out, cfg, g)]
            _shard_groups(cfg, out, todo, done=len(mine) - len(todo), owner=owner)
            if part.count > 1:
                print(f"partition {part.index}/{part.count}: {len(mine)} groups done; "
                      f"run with merge=true once every partition has finished")
                return None
        return _merge(cfg, out, groups, labels, time.time() - t_start, time.process_time() - cpu_start)
    finally:
        out.unlock()


def _finished(out: Output, cfg: ShardsConfig, g: Group) -> bool:
    name = g.record
    if not out.exists(name):
        return False
    rec = out.read_json(name)
    if rec.get("fingerprint") != fingerprint(cfg, g):
        raise ShardsError(f"{out.url} holds group {g.name} made from other inputs or settings "
                          f"({name} does not match this run's config); write into a new output folder, "
                          "or delete the old one")
    return True


def _shard_groups(cfg: ShardsConfig, out: Output, todo: List[Group], done: int, owner: str) -> None:
    if not todo:
        return
    tmpdir = out.tmpdir(owner)
    writers = {g.name: GroupWriter(g, out, cfg, tmpdir) for g in todo}
    jobs = []
    for g in todo:
        for pos, (s, key, label_index) in enumerate(zip(g.sources, g.keys, g.label_index)):
            jobs.append(((g.name, pos), Job(key, s.url, s.label, label_index, cfg.transcode, cfg.filter)))
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), unit="video", disable=not cfg.progress, file=sys.stderr,
               desc=f"shards ({done} groups already done)" if done else "shards", smoothing=0.05)
    reasons: Counter = Counter()
    stats = ShardsMetrics(cfg.metrics_port)

    def on_result(tag, result) -> None:
        gname, pos = tag
        if isinstance(result, Reject):
            reasons[result.reason] += 1
            stats.reject(result.reason)
        else:
            stats.sample(result.meta["source_duration"], len(result.video))
        bar.update(1)
        if reasons:
            bar.set_postfix(rejected=sum(reasons.values()), refresh=False)
        if writers[gname].add(pos, result):
            writers.pop(gname).finish()
            stats.group()

    try:
        run_jobs(jobs, workers, on_result)
    finally:
        bar.close()
        stats.close()
        shutil.rmtree(tmpdir, ignore_errors=True)  # holds nothing with a final name; local or not


def _merge(cfg: ShardsConfig, out: Output, groups: List[Group], labels: Dict[str, int], wall: float,
           cpu: float) -> dict:
    missing = [g.name for g in groups if not _finished(out, cfg, g)]
    if missing:
        raise ShardsError(f"cannot write the manifest of {out.url}: {len(missing)} groups are not finished "
                          f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); run the "
                          "partitions that own them (group % partition.count == partition.index)")
    rows, shards, rejects = [], [], []
    source_seconds = cpu_seconds = 0.0
    for g in groups:
        rec = out.read_json(g.record)
        rows += rec["samples"]
        shards += rec["shards"]
        rejects += rec["rejects"]
        source_seconds += rec["source_seconds"]
        cpu_seconds += rec["cpu_seconds"]
    classes = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    summary = {
        "videos_in": sum(len(g.sources) for g in groups),
        "sharded": len(rows),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "hours": round(sum(r["duration"] for r in rows) / 3600, 4),
        "source_hours": round(source_seconds / 3600, 4),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": len(shards),
        "splits": dict(sorted(Counter(r["split"] for r in rows).items())),
    }
    meta = {"created_by": "tubelet make_shards", "classes": classes, "summary": summary,
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("workers", "progress", "merge",
                                                                           "partition", "metrics_port")}}
    write_manifest(out.url, rows, shards, rejects, meta)
    speed = {"wall_seconds": round(wall, 2), "worker_cpu_seconds": round(cpu_seconds, 2),
             "videos_per_second": round(summary["videos_in"] / wall, 2) if wall > 0 else None,
             "source_seconds_per_cpu_second": round(source_seconds / cpu_seconds, 2) if cpu_seconds else None}
    _print_summary(out.url, summary, speed)
    return dict(summary, **speed)


def _print_summary(url: str, s: dict, speed: dict) -> None:
    rej = ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "none"
    print(f"\n{url}/{MANIFEST}\n"
          f"  videos in      {s['videos_in']}\n"
          f"  sharded        {s['sharded']}  ({', '.join(f'{k}: {v}' for k, v in s['splits'].items())})\n"
          f"  rejected       {sum(s['rejected'].values())}  ({rej}; see rejects.parquet)\n"
          f"  video hours    {s['hours']:.3f}\n"
          f"  bytes written  {s['bytes']:,} in {s['shards']} shards\n"
          f"  throughput     {speed['videos_per_second']} videos/s, "
          f"{speed['source_seconds_per_cpu_second']} source-seconds per worker CPU-second "
          f"(this invocation: {speed['wall_seconds']} s wall)")


