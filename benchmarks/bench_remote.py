"""`make bench-remote`: one epoch of a shard set served by a local S3 server through a cache ten times smaller
than the set, against the same set read from local disk; exact resume after kill -9 mid-epoch; and what the
window order costs in shuffle quality.

    python -m benchmarks.bench_remote [videos=320] [seconds=2.5] [cache_fraction=0.1] [--json FILE]

1. Inputs: `videos` generated H.264 files (`benchmarks.bench_shards.write_input`), sharded once with `make shards`
   (`shard_samples` videos per shard, so the set has many shards), into `cache`.
2. The set is uploaded to moto's S3 server on 127.0.0.1 (`benchmarks/s3.py`; clients find it through
   AWS_ENDPOINT_URL and the AWS_* credentials, as they would a real endpoint).
3. Local: two epochs of the DALI loader on the local set, clips/s after the first batch of each.
   Remote: two epochs from s3:// with data.cache_max_bytes = cache_fraction x the set's bytes, window order
   (one canonical node, `data.shuffle_window` shards), prefetch by plan. A thread samples the cache folder's bytes
   on disk every 5 ms. Reported per epoch: clips/s (target >= 0.9x local), bytes downloaded / set bytes (target
   <= 1.1; each epoch's count includes the read-ahead of the next epoch's first shards, so the second epoch is
   the steady state), hits, misses, evictions, seconds the loader blocked on downloads; the sampled peak against
   the limit.
4. kill -9: a subprocess streams the epoch from s3:// (a fresh cache), recording each batch's keys and the
   loader's state; it is killed with SIGKILL after `kill_after` batches, a second one resumes from the last state
   it recorded; the keys of both must equal the uninterrupted epoch's, in order.
5. Shuffle quality (no decoding: the plan alone), on a label-sorted set like ImageNet's class folders sharded in
   order (`quality_samples` samples, `quality_classes` classes, `quality_shard` samples per shard): per batch of
   `quality_batch`, the mean number of distinct labels and the mean longest run of one label in batch order,
   for the global permutation and the window order at several windows and canonical nodes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks.bench_shards import make_inputs
from benchmarks.s3 import S3Server, s3_env
from common.cli import main_for
from common.config import check, load_config, to_dict
from pipeline.config import LoaderConfig
from pipeline.sampling import Plan
from shards.build import run as make_shards
from shards.config import ShardsConfig
from shards.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _bench_data() -> LoaderConfig:
    return LoaderConfig(batch_size=8, shuffle="window", canonical_nodes=1, shuffle_window=1, device="cpu")


@dataclass
class BenchRemoteConfig:
    data: LoaderConfig = field(default_factory=_bench_data)  # the clips and the order (data.root is set here)
    videos: int = 320  # generated inputs
    seconds: float = 2.5
    size: str = "320x180"
    fps: int = 30
    shard_samples: int = 8  # videos per shard: 40 shards, so a cache of a tenth of the set holds 4
    cache_fraction: float = 0.1  # data.cache_max_bytes as a fraction of the set's bytes
    cache: str = "data/bench/remote"  # inputs and the shard set, made once
    kill_after: int = 5  # batches before the kill -9
    quality_samples: int = 12800
    quality_classes: int = 100
    quality_shard: int = 128
    quality_batch: int = 64
    json: str = ""  # also write the results as JSON here (`--json FILE` works too)

    def validate(self) -> None:
        check(self.videos >= 2 and self.seconds > 0, "videos", "videos >= 2, seconds > 0")
        check(0 < self.cache_fraction <= 1, "cache_fraction", "must be in (0, 1]")
        check(self.shard_samples >= 1 and self.kill_after >= 1, "shard_samples", "shard_samples, kill_after >= 1")


def shard_set(args: BenchRemoteConfig) -> str:
    w, h = (int(p) for p in args.size.split("x"))
    inputs = make_inputs(Path(args.cache), args.videos, args.seconds, w, h, args.fps)[0].parent
    out = Path(args.cache) / f"{inputs.name}-x{args.videos}-per{args.shard_samples}"
    if not (out / "manifest.parquet").exists():
        make_shards(load_config(ShardsConfig, None, [
            f"inputs.train={inputs}", f"output={out}", "progress=false", f"shard.max_samples={args.shard_samples}",
            f"transcode.frame_step={args.data.frame_stride}", "transcode.keyframe_interval=16"]))
    return str(out)


def cache_bytes(folder: Path) -> int:
    """What a cache folder holds on disk now: complete shards and partial downloads (lock files are empty)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            if not f.endswith(".lock"):
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
    return total


class PeakBytes:
    """`with PeakBytes(folder) as peak:` samples `cache_bytes(folder)` every `interval` s on a thread; `peak.value`
    is the largest seen (None for no folder: nothing sampled)."""

    def __init__(self, folder: Optional[Path], interval: float = 0.005):
        self.folder, self.interval, self.value = folder, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, cache_bytes(self.folder))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakBytes":
        if self.folder is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.folder is not None:
            self._thread.join()


def epochs(cfg: LoaderConfig, count: int, sample_dir: Optional[Path] = None) -> Dict:
    """`count` epochs of the DALI loader: clips/s (after the first batch), the keys in order and the cache's
    counters at the end of each epoch; with `sample_dir`, the peak bytes sampled in it."""
    from pipeline.loader import VideoLoader

    loader = VideoLoader(cfg)
    with PeakBytes(sample_dir) as peak:
        out = _epochs(loader, count)
    return {"epochs": out, "peak_bytes": peak.value}


def _epochs(loader, count: int) -> List[Dict]:
    out = []
    try:
        it = iter(loader)
        for e in range(count):
            keys, clips, t0 = [], 0, None
            while True:
                b = next(it)
                keys += [k for k, pad in zip(b.keys, b.padded.tolist()) if not pad]
                if t0 is None:
                    t0 = time.perf_counter()
                else:
                    clips += len(b.keys)
                if loader.state_dict()["position"] >= len(loader.index):
                    break
            stats = loader.store.cache_stats
            out.append({"clips_per_s": clips / (time.perf_counter() - t0), "keys": keys,
                        "cache": None if stats is None else to_dict(stats)})
    finally:
        loader.close()
    return out


def stream(cfg_json: str, out: str, state_json: str = "") -> None:
    """Subprocess body of the kill -9 check: stream the rest of epoch 0 from `state_json`, one JSON line per
    batch ({keys, state}), flushed and fsynced, so what a killed run recorded is on disk."""
    from pipeline.loader import VideoLoader

    from omegaconf import OmegaConf

    loader = VideoLoader(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoaderConfig), json.loads(cfg_json))))
    if state_json:
        loader.load_state_dict(json.loads(state_json))
        if loader.state_dict()["position"] >= len(loader.index):  # the killed run had finished the epoch
            return
    with open(out, "a") as f:
        for b in loader:
            state = loader.state_dict()
            f.write(json.dumps({"keys": [k for k, p in zip(b.keys, b.padded.tolist()) if not p], "state": state})
                    + "\n")
            f.flush()
            os.fsync(f.fileno())
            if state["position"] >= len(loader.index):
                break
    loader.close()


def kill_and_resume(cfg: LoaderConfig, work: Path, kill_after: int) -> Dict:
    cfg_json = json.dumps(to_dict(cfg))
    log = work / "stream.jsonl"
    log.unlink(missing_ok=True)

    def start(state: str = "") -> subprocess.Popen:
        code = f"from benchmarks.bench_remote import stream; stream({cfg_json!r}, {str(log)!r}, {state!r})"
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))

    def lines() -> List[dict]:
        if not log.exists():
            return []
        out = []
        for ln in log.read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:  # a line cut by the kill
                break
        return out

    proc = start()
    deadline = time.time() + 600
    while len(lines()) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = lines()
    proc = start(json.dumps(before[-1]["state"]))
    proc.wait(timeout=600)
    after = lines()[len(before):]
    return {"killed_after_batches": len(before), "resumed_batches": len(after),
            "keys": [k for ln in before + after for k in ln["keys"]], "resume_exit_code": proc.returncode}


def shuffle_quality(args: BenchRemoteConfig) -> List[Dict]:
    """Distinct labels and longest same-label run per batch, global vs window order, on a label-sorted set."""
    n, classes, per_shard, batch = args.quality_samples, args.quality_classes, args.quality_shard, args.quality_batch
    labels = np.arange(n) * classes // n  # class folders sharded in order: each shard holds one or two classes
    shard_of_row = np.arange(n) // per_shard
    geom = [(100, 256, 256)] * n
    rows = []
    variants = [("global", {}), *[(f"window {w}, canonical nodes {c}", {"shuffle": "window", "window": w,
                                                                         "partitions": c})
                                  for c in (1, 8) for w in (1, 4, 16)]]
    for name, kw in variants:
        plan = Plan(geom, batch_size=batch, seed=0, shard_counts=np.bincount(shard_of_row), **kw)
        distinct, runs = [], []
        for _ in range(n // batch):
            lab = labels[next(plan).rows]
            distinct.append(len(set(lab.tolist())))
            change = np.flatnonzero(np.diff(lab)) + 1
            runs.append(int(np.diff(np.concatenate([[0], change, [len(lab)]])).max()))
        rows.append({"order": name, "distinct_labels": float(np.mean(distinct)), "longest_run": float(np.mean(runs))})
    return rows


def bench(args: BenchRemoteConfig) -> Dict:
    root = shard_set(args)
    m = read_manifest(root)
    set_bytes = sum(s["bytes"] for s in m.shards)
    limit = int(args.cache_fraction * set_bytes)
    work = Path(args.cache) / "run"
    server = S3Server()
    try:
        with s3_env(server.endpoint):
            import fsspec

            fs = fsspec.filesystem("s3")
            fs.mkdir("bench")
            fs.put(root.rstrip("/") + "/", "bench/set/", recursive=True)
            url = "s3://bench/set"
            base = replace(args.data, root=root)
            local_runs = epochs(base, 2)["epochs"]
            local = local_runs[0]
            cache = work / "cache"
            shutil.rmtree(work, ignore_errors=True)
            remote_cfg = replace(base, root=url, cache_dir=str(cache), cache_max_bytes=limit)
            remote = epochs(remote_cfg, 2, sample_dir=cache)
            shutil.rmtree(cache, ignore_errors=True)
            resumed = kill_and_resume(remote_cfg, work, args.kill_after)
    finally:
        server.stop()
    quality = shuffle_quality(args)

    c = args.data
    first, second = remote["epochs"]
    stats, total = second["cache"], first["cache"]
    steady = {k: total_v2 - first["cache"][k] for k, total_v2 in stats.items()}  # the second epoch alone
    print(f"\n{len(m.samples)} videos in {len(m.shards)} shards ({set_bytes:,} bytes) from moto's S3 server on "
          f"127.0.0.1, cache limit {limit:,} bytes ({args.cache_fraction:g} x the set); clips {c.num_frames}x"
          f"{c.crop_size}x{c.crop_size}, batch {c.batch_size}, window order (window {c.shuffle_window}, canonical "
          f"nodes {c.canonical_nodes}); {platform.node()}, {len(os.sched_getaffinity(0))} cores\n")
    print("| read from | clips/s | bytes downloaded / set | misses | hits | evictions | s blocked on downloads |\n"
          "|---|---|---|---|---|---|---|")
    for i, e in enumerate(local_runs):
        print(f"| local disk, epoch {i + 1} | {e['clips_per_s']:.1f} | | | | | |")
    for name, e, st in (("s3://, first epoch (cold cache)", first, total), ("s3://, second epoch", second, steady)):
        print(f"| {name} | {e['clips_per_s']:.1f} | {st['bytes_downloaded'] / set_bytes:.2f} | {st['misses']} | "
              f"{st['hits']} | {st['evictions']} | {st['wait_seconds']:.2f} |")
    same = resumed["keys"] == first["keys"] == local["keys"]
    local_rate = sum(e["clips_per_s"] for e in local_runs) / 2
    ratio = (first["clips_per_s"] + second["clips_per_s"]) / 2 / local_rate
    print(f"\nremote / local clips/s: {ratio:.2f}x (means of two epochs each); peak cache bytes sampled every 5 ms: "
          f"{remote['peak_bytes']:,} (limit {limit:,}); each epoch's downloads include the read-ahead into the next "
          f"(the shards its first steps read); kill -9 after {resumed['killed_after_batches']} batches, resumed for "
          f"{resumed['resumed_batches']}: the epoch's keys {'equal' if same else 'DIFFER FROM'} the uninterrupted "
          "run's (and the local run's), in order")
    print(f"\nshuffle quality: {args.quality_samples} samples, {args.quality_classes} classes sorted into shards of "
          f"{args.quality_shard}, batch {args.quality_batch} (ideal: about "
          f"{args.quality_classes * (1 - (1 - 1 / args.quality_classes) ** args.quality_batch):.1f} distinct)\n")
    print("| order | distinct labels per batch | longest same-label run |\n|---|---|---|")
    for q in quality:
        print(f"| {q['order']} | {q['distinct_labels']:.1f} | {q['longest_run']:.2f} |")
    result = {"set_bytes": set_bytes, "cache_max_bytes": limit, "shards": len(m.shards), "videos": len(m.samples),
              "local_clips_per_s": [e["clips_per_s"] for e in local_runs],
              "remote_clips_per_s": [first["clips_per_s"], second["clips_per_s"]], "remote_over_local": ratio,
              "downloaded_over_set": [total["bytes_downloaded"] / set_bytes, steady["bytes_downloaded"] / set_bytes],
              "peak_cache_bytes": remote["peak_bytes"], "cache": [total, steady], "resume_exact": same,
              "killed_after_batches": resumed["killed_after_batches"], "shuffle_quality": quality}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchRemoteConfig, bench, argv, prog="python -m benchmarks.bench_remote", doc=__doc__,
                    flags={"--json": "json"})


if __name__ == "__main__":
    raise SystemExit(main())
