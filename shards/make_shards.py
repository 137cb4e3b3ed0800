"""`make shards`: raw videos -> validated WebDataset shards + DALI indexes + a parquet manifest.

    python -m shards.make_shards [--config configs/shards.yaml] [key=value ...]

Work is cut into *groups*: each split's inputs, in listing order, in runs of `shard.max_samples`. Group g
of split s becomes shard `s-{g:06d}.tar` (spilling into `s-{g:06d}-{p}.tar` past `shard.max_bytes`), and
is finished when its record `_parts/s-{g:06d}.json` exists. That gives:
- determinism: a group's content depends only on its inputs and the config;
- resume: a restarted run skips finished groups; unfinished ones are rewritten from scratch, and a shard
  only gets its final name once complete (temp file + rename), so a reader never takes a partial file;
- partitions: job i of N takes the groups g with g % N == i; `merge=true` then writes the one manifest,
  identical to a single run's, from the group records.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import shutil
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import posixpath
import socket
import sys
import tarfile
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Optional, Sequence, Tuple

import fsspec

from common.config import ConfigError, load_config, to_dict
from shards.config import ShardsConfig
from shards.manifest import MANIFEST, fsync_dir, write_manifest
from shards.sources import InputError, Source, check_unique_keys, label_map, list_split
from shards.transcode import Job, Reject, Sample, meta_json, nframes_bytes, process
from shards.wds import ShardWriter, format_index, sha256_file

PARTS = "_parts"


class ShardsError(RuntimeError):
    """The run cannot go on (locked output, config mismatch, missing partitions); the message says why."""


@dataclass
class Group:
    split: str
    index: int
    sources: List[Source]
    keys: List[str]
    label_index: List[Optional[int]]  # class index of each source (numbered over all splits)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


# ----------------------------------------------------------------------------------------------------
# planning


def plan(cfg: ShardsConfig) -> Tuple[List[Group], Dict[str, int]]:
    """List every split's inputs and cut them into groups (deterministic, identical in every partition)."""
    listed = {split: list_split(spec, cfg.labels_from_dirs) for split, spec in sorted(cfg.inputs.items())}
    labels = label_map(listed)
    groups = []
    for split, sources in listed.items():
        if not sources:
            raise InputError(f"inputs.{split}={cfg.inputs[split]} names no video files")
        keys = check_unique_keys(split, sources)
        n = cfg.shard.max_samples
        index = [labels[s.label] if s.label is not None else None for s in sources]
        for g in range(0, len(sources), n):
            groups.append(Group(split, g // n, sources[g:g + n], keys[g:g + n], index[g:g + n]))
    return groups, labels


def fingerprint(cfg: ShardsConfig, group: Group) -> str:
    """What a group's output depends on: its inputs, their class indices, the transcode/filter settings."""
    h = hashlib.sha256()
    h.update(json.dumps([to_dict(cfg.transcode), to_dict(cfg.filter), cfg.shard.max_bytes], sort_keys=True).encode())
    for s, k, i in zip(group.sources, group.keys, group.label_index):
        h.update(f"\0{s.url}\0{s.label}\0{i}\0{k}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# output folder: local or fsspec


class Output:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.local = "file" in self.fs.protocol
        self.fs.makedirs(posixpath.join(self.path, PARTS), exist_ok=True)
        self._lock_fd: Optional[int] = None

    def p(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.p(name))

    def read_json(self, name: str) -> dict:
        with self.fs.open(self.p(name), "r") as f:
            return json.load(f)

    def put_atomic(self, name: str, src_local: str) -> None:
        """Give a finished local file its final name in the output; readers never see it partial."""
        if self.local:
            with open(src_local, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(src_local, 0o644)  # mkstemp makes 0600; shards are for every reader
            os.replace(src_local, self.p(name))
            fsync_dir(os.path.dirname(self.p(name)))
        else:
            self.fs.put_file(src_local, self.p(name))  # an object store's put is all or nothing
            os.unlink(src_local)

    def write_bytes_atomic(self, name: str, data: bytes, tmpdir: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=tmpdir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.put_atomic(name, tmp)

    def tmpdir(self, owner: str) -> str:
        """Where shards are assembled: inside the output (same filesystem, so rename is atomic) if local.

        Emptied first: what a killed run left there was never given a final name, so nothing reads it.
        """
        if not self.local:
            return tempfile.mkdtemp(prefix="tubelet-shards-")
        d = self.p(f".tmp-{owner}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def lock(self, what: str) -> None:
        """Refuse a second run into the same output (per partition) while one is running."""
        name = f".lock-{what}"
        info = f"host={socket.gethostname()} pid={os.getpid()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}"
        if self.local:
            fd = os.open(self.p(name), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even on kill -9
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise ShardsError(f"another `make shards` is writing {self.url} ({holder}); wait for it to "
                                  "finish, or use another output folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            self._lock_fd = fd
        else:
            if self.exists(name):
                with self.fs.open(self.p(name), "r") as f:
                    holder = f.read().strip()
                raise ShardsError(f"{self.url} is locked by another `make shards` ({holder}); if no job is "
                                  f"running (it was killed), delete {self.url}/{name} and start again")
            with self.fs.open(self.p(name), "w") as f:
                f.write(info)
            self._lock_name = name

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        elif getattr(self, "_lock_name", None):
            self.fs.rm(self.p(self._lock_name))


# ----------------------------------------------------------------------------------------------------
# writing one group


class GroupWriter:
    """Collects a group's results in input order and writes its shard(s), index(es) and record."""

    def __init__(self, group: Group, out: Output, cfg: ShardsConfig, tmpdir: str):
        self.group, self.out, self.cfg, self.tmpdir = group, out, cfg, tmpdir
        self.results: Dict[int, Sample | Reject] = {}

    def add(self, pos: int, result: Sample | Reject) -> bool:
        self.results[pos] = result
        return len(self.results) == len(self.group.sources)

    def finish(self) -> dict:
        g, cfg = self.group, self.cfg
        shards, rows, rejects = [], [], []
        writer, tmp, f = None, None, None
        part = 0

        def close_shard() -> None:
            nonlocal writer, tmp, f, part
            writer.close()
            f.close()
            name = g.name + (f"-{part}" if part else "")
            with open(tmp, "rb") as fh:
                digest = sha256_file(fh)
            size = os.path.getsize(tmp)
            self.out.write_bytes_atomic(f"{name}.idx", format_index(writer.samples).encode(), self.tmpdir)
            self.out.put_atomic(f"{name}.tar", tmp)
            shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "split": g.split, "bytes": size,
                           "samples": len(writer.samples), "sha256": digest})
            for row in rows[-len(writer.samples):]:
                row["shard"] = f"{name}.tar"
            writer, part = None, part + 1

        for pos in range(len(g.sources)):
            r = self.results[pos]
            if isinstance(r, Reject):
                rejects.append({"key": r.key, "split": g.split, "source": r.source, "reason": r.reason,
                                "detail": r.detail})
                continue
            comps = [(r.ext, r.video), ("json", meta_json(r.meta)), ("nframes", nframes_bytes(r.meta["nframes"]))]
            if r.meta["label_index"] is not None:
                comps.append(("cls", str(r.meta["label_index"]).encode()))
            need = sum(512 + -(-len(d) // 512) * 512 for _, d in comps)
            if writer is not None and writer.samples and \
                    closed_size(writer.bytes_written + need) > cfg.shard.max_bytes:
                close_shard()
            if writer is None:
                fd, tmp = tempfile.mkstemp(dir=self.tmpdir, suffix=".tar")
                f = os.fdopen(fd, "wb")
                writer = ShardWriter(f)
            members = {m.ext: m for m in writer.write(r.key, comps)}
            rows.append(_row(g.split, len(writer.samples) - 1, r, members))
        if writer is not None:
            close_shard()
        record = {"group": g.name, "split": g.split, "fingerprint": fingerprint(cfg, g), "shards": shards,
                  "samples": rows, "rejects": rejects,
                  "source_seconds": sum(r.meta["source_duration"] for r in self.results.values()
                                        if isinstance(r, Sample)),
                  "cpu_seconds": sum(r.seconds for r in self.results.values())}
        # the record is the commit point of the group: written last, atomically
        self.out.write_bytes_atomic(f"{PARTS}/{g.name}.json", json.dumps(record).encode(), self.tmpdir)
        return record


def closed_size(offset: int) -> int:
    """The size of a tar closed at `offset`: tarfile adds two zero blocks, then pads to a whole record."""
    return -(-(offset + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _row(split: str, index: int, r: Sample, m: Dict) -> dict:
    meta = r.meta
    cls = m.get("cls")
    return {
        "key": r.key, "split": split, "shard": None, "index": index, "ext": r.ext,
        "video_offset": m[r.ext].offset, "video_size": m[r.ext].size,
        "json_offset": m["json"].offset, "json_size": m["json"].size,
        "nframes_offset": m["nframes"].offset, "nframes_size": m["nframes"].size,
        "cls_offset": cls.offset if cls else -1, "cls_size": cls.size if cls else -1,
        "source": meta["source"], "source_bytes": meta["source_bytes"], "duration": meta["duration"],
        "fps": meta["fps"], "nframes": meta["nframes"], "width": meta["width"], "height": meta["height"],
        "codec": meta["codec"], "label": meta["label"], "label_index": meta["label_index"],
        "rotation": meta["rotation"], "vfr": meta["vfr"],
    }


# ----------------------------------------------------------------------------------------------------
# running the work, crash-isolated


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


# ----------------------------------------------------------------------------------------------------
# the command


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
    name = f"{PARTS}/{g.name}.json"
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
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="video", disable=not cfg.progress, file=sys.stderr,
               desc=f"shards ({done} groups already done)" if done else "shards", smoothing=0.05)
    reasons: Counter = Counter()
    stats = _metrics(cfg.metrics_port)

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
        rec = out.read_json(f"{PARTS}/{g.name}.json")
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


def _metrics(port: int):
    from shards.metrics import ShardsMetrics

    return ShardsMetrics(port)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file over the defaults (configs/shards.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value settings, e.g. inputs.train=/data/train.csv")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(ShardsConfig, args.config, args.overrides)
        if not cfg.inputs:
            from shards.synthetic.render import generate

            root = generate(cfg.sample_dir)
            cfg = dataclasses.replace(cfg, inputs={"train": str(root / "train.csv"), "val": str(root / "val.csv")})
        run(cfg)
    except (ConfigError, InputError, ShardsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
