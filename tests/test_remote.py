"""Object storage, against a real S3 API (moto's server on 127.0.0.1, s3fs as the fsspec backend): `make shards`
into s3://, training from s3://, the node's bounded shared cache, kill -9 mid-download, retries under injected
faults, permanent errors at once, and the cache's metrics.

botocore and s3fs retry some errors themselves (25 tries over ~30 s for a 503); here they are set to one try
(AWS_MAX_ATTEMPTS=1, S3FileSystem.retries=1) so the injected faults reach tubelet's own retry layer quickly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.bench_remote import PeakBytes
from benchmarks.s3 import FaultyProxy, S3Server, object_get, s3_env
from common.config import load_config
from common.retry import RetryPolicy
from pipeline.cache import ShardCache
from pipeline.config import LoaderConfig
from pipeline.split_index import open_split, plan_for
from pipeline.store import store_for
from shards.build import run as shard_run
from shards.config import ShardsConfig
from shards.manifest import read_manifest, read_rejects, verify
from shards.output import ShardsError

REPO = Path(__file__).resolve().parents[1]
BUCKET = "tubelet"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server behind a fault-injecting proxy (no faults until a test sets `proxy.fault`); the standard
    AWS variables point at the proxy for the module."""
    import s3fs

    server = S3Server()
    proxy = FaultyProxy(server.endpoint, lambda method, path, n: None)
    saved = s3fs.S3FileSystem.retries, os.environ.get("AWS_MAX_ATTEMPTS")
    s3fs.S3FileSystem.retries = 1
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    with s3_env(proxy.endpoint):
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield proxy
    s3fs.S3FileSystem.retries = saved[0]
    if saved[1] is None:
        os.environ.pop("AWS_MAX_ATTEMPTS", None)
    else:
        os.environ["AWS_MAX_ATTEMPTS"] = saved[1]
    proxy.stop()
    server.stop()


@pytest.fixture
def no_faults(s3):
    """The proxy for a test that sets faults: counts from 0, and no faults once it ends."""
    s3.faults.clear()
    yield s3
    s3.fault = lambda method, path, n: None


def make_shards(inputs: dict, output: str, *extra: str) -> dict:
    args = [f"inputs.{k}={v}" for k, v in inputs.items()]
    return shard_run(load_config(ShardsConfig, None, args + [f"output={output}", "workers=2", "progress=false",
                                                              "retry_backoff_s=0.01", *extra]))


@pytest.fixture(scope="module")
def s3_set(s3, small_shards) -> str:
    """The small set's videos sharded by `make shards` straight into s3://, one sample per shard (12 train
    shards: enough for a cache to be smaller than the set)."""
    src = Path(small_shards).parent
    url = f"s3://{BUCKET}/small"
    make_shards({"train": src / "train.csv", "val": src / "val.csv"}, url, "shard.max_samples=1")
    return url


def loader_cfg(root: str, cache: Path, *extra: str) -> LoaderConfig:
    return load_config(LoaderConfig, None, [f"root={root}", f"cache_dir={cache}", "batch_size=3", "num_frames=8",
                                            "frame_stride=3", "crop_size=48", "dtype=fp32", "threads=1",
                                            "device=cpu", "retry_backoff_s=0.01", *extra])


def test_make_shards_writes_s3_and_the_trainer_trains_from_it(s3_set, small_shards, tmp_path):
    from train.trainer import run as train_run
    from train.config import TrainConfig

    m, local = read_manifest(s3_set), read_manifest(small_shards)
    assert sorted(m.samples.column("key").to_pylist()) == sorted(local.samples.column("key").to_pylist())
    assert len(m.shards) == 16 and read_rejects(s3_set).num_rows == 0
    cache = tmp_path / "cache"
    cfg = load_config(TrainConfig, None, [
        "model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.num_frames=4",
        "model.predictor_width=96", "model.predictor_depth=2", "model.predictor_heads=4", "data.crop_size=32",
        "data.num_frames=4", "data.frame_stride=1", "data.batch_size=2", "data.threads=1", "data.dtype=fp32",
        "data.device=cpu", "device=cpu", "metrics.enabled=false", "optim.warmup_steps=2", "log_every=1",
        "checkpoint.keep_last=0", f"data.root={s3_set}", f"data.cache_dir={cache}", f"run_dir={tmp_path / 'run'}",
        "schedule.total_steps=4", "checkpoint.every_steps=2"])
    summary = train_run(cfg)
    assert summary["step"] == 4
    cached = [p for p in cache.rglob("*.tar")]
    assert cached and {p.name for p in cached} <= {s["name"] for s in m.shards}
    assert not [p for p in cache.rglob("*.part")]


def read_epoch(cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
    """Read every sample of one epoch through the store, in the plan's order, as the loader's feeder does
    (prefetch by plan included); returns (keys read, cache stats)."""
    index = open_split(cfg.root, cfg.split, retry=cfg.retry_policy())
    plan = plan_for(index, cfg, rank=rank, world_size=world_size)
    store = store_for(cfg)
    keys = []
    try:
        for _ in range(plan.steps_per_epoch):
            bp = next(plan)
            store.prefetch(bp.rows, plan.upcoming_rows(cfg.prefetch_steps), index.shard_of, index.shard_bytes)
            for r, pad in zip(bp.rows, bp.padded):
                index.read_video(store, r)  # CRC-checked
                if not pad:
                    keys.append(index.key(r))
        return keys, store.cache_stats
    finally:
        store.close()


def test_a_bounded_cache_stays_under_its_limit_and_reads_each_shard_about_once(s3_set, tmp_path):
    m = read_manifest(s3_set)
    train = [s for s in m.shards if s["name"].startswith("train")]
    limit = 4 * max(s["bytes"] for s in train)
    cache = tmp_path / "cache"
    cfg = loader_cfg(s3_set, cache, f"cache_max_bytes={limit}", "shuffle_window=1")
    with PeakBytes(cache, interval=0.002) as peak:
        keys, stats = read_epoch(cfg)
    assert sorted(keys) == sorted(open_split(s3_set, "train").keys)  # every sample once
    total = sum(s["bytes"] for s in train)
    assert 0 < peak.value <= limit, (peak.value, limit)
    assert stats.evictions > 0 and stats.bytes_on_disk <= limit
    assert stats.bytes_downloaded <= 1.1 * total, (stats.bytes_downloaded, total)
    assert stats.wait_seconds >= 0 and stats.hits > 0


def test_shards_appear_and_go_only_under_the_cache_folders_lock(s3_set, tmp_path, monkeypatch):
    """What the cache holds changes only under its folder lock: a shard that arrives (the rename of its finished
    download) or is evicted while another thread or process counts the folder could be missed by that count, and
    one more shard would be let in past `cache_max_bytes` (seen twice in about 40 runs of `make bench-remote`'s
    small set: four shards in a cache with room for three)."""
    import fcntl

    import pipeline.cache as cache_mod

    m = read_manifest(s3_set)
    limit = 3 * max(s["bytes"] for s in m.shards if s["name"].startswith("train"))
    cache = tmp_path / "cache"
    unlocked: list = []

    def folder_locked(folder: Path) -> bool:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: blocked while anyone holds it
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def checked(real):
        def op(*paths):
            target = Path(paths[-1])  # a shard or a shard's rows, in the set's folder of the cache
            if target.parent.parent == cache and not target.name.startswith(".") and not folder_locked(target.parent):
                unlocked.append((real.__name__, target.name))
            return real(*paths)
        return op

    monkeypatch.setattr(cache_mod.os, "replace", checked(os.replace))
    monkeypatch.setattr(cache_mod.os, "unlink", checked(os.unlink))
    keys, stats = read_epoch(loader_cfg(s3_set, cache, f"cache_max_bytes={limit}", "shuffle_window=1"))
    assert stats.evictions > 0 and stats.misses > 3  # shards came and went
    assert not unlocked, unlocked


def _reader(root: str, cache: str, out: str) -> None:
    keys, stats = read_epoch(loader_cfg(root, Path(cache), "shuffle=global"))
    Path(out).write_text(f"{len(keys)} {stats.misses}")


def test_the_ranks_of_a_node_download_each_shard_once(s3_set, tmp_path):
    """Two processes (two ranks of a node) read every sample in different orders through one cache folder:
    each shard is downloaded once in all."""
    import multiprocessing as mp

    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_reader, args=(s3_set, str(cache), str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    counts = [tuple(map(int, (tmp_path / f"out{i}").read_text().split())) for i in range(2)]
    train_shards = {s for s in open_split(s3_set, "train").shards}
    assert [c[0] for c in counts] == [12, 12]
    assert sum(c[1] for c in counts) == len(train_shards)


def test_kill_9_mid_download_never_leaves_a_shard_that_looks_complete(s3_set, no_faults, tmp_path):
    proxy = no_faults
    shard = read_manifest(s3_set).shards[0]
    proxy.stall_s = 60.0
    proxy.fault = lambda method, path, n: ("stall" if object_get(method, path)
                                           and path.split("?")[0].endswith(shard["name"]) else None)
    cache = tmp_path / "cache"
    code = (f"from pipeline.store import ShardStore\n"
            f"s = ShardStore({s3_set!r}, {str(cache)!r})\n"
            f"s.cache.path({shard['name']!r}, {shard['bytes']})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not [p for p in cache.rglob("*.part") if p.stat().st_size > 0]:
            time.sleep(0.05)
        parts = list(cache.rglob("*.part"))
        assert parts and parts[0].stat().st_size > 0, "the download never started"
        assert parts[0].stat().st_size < shard["bytes"]  # mid-body
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = parts[0].parent
    assert not (folder / shard["name"]).exists()  # the partial file never had the shard's name
    proxy.fault = lambda method, path, n: None
    c = ShardCache(__import__("fsspec").filesystem("s3"), s3_set.removeprefix("s3://"), str(folder), 10**9,
                   RetryPolicy(backoff_s=0.01))
    try:
        assert not list(folder.glob("*.part"))  # the killed process's leftover is gone
        path = c.path(shard["name"], shard["bytes"])
        assert os.path.getsize(path) == shard["bytes"] and c.stats.misses == 1
    finally:
        c.close()


def test_transient_faults_are_retried_and_the_bytes_are_right(s3_set, small_shards, no_faults, tmp_path):
    """503 SlowDown and connections cut mid-body on shard downloads: the loader retries them and reads exactly
    the samples a local read gives (every one CRC-checked)."""
    proxy = no_faults
    gets = [0]

    def fault(method, path, n):
        if object_get(method, path) and path.split("?")[0].endswith(".tar"):
            gets[0] += 1
            return {1: "503", 2: "cut", 4: "503", 5: "cut"}.get(gets[0])
        return None

    proxy.fault = fault
    cfg = loader_cfg(s3_set, tmp_path / "cache", "shuffle=global")
    remote_keys, stats = read_epoch(cfg)
    assert proxy.faults == {"503": 2, "cut": 2}
    assert stats.retries == 4  # each fault cost one retry of tubelet's (s3fs and botocore: one try here)
    assert remote_keys == read_epoch(loader_cfg(small_shards, tmp_path / "unused", "shuffle=global"))[0]


def test_permanent_errors_fail_at_once_naming_the_url(s3_set, no_faults, tmp_path, monkeypatch):
    """A missing bucket, a missing object, access denied: no retry (no backoff is ever slept, and the proxy counts
    one request), the URL named."""
    import common.retry

    def no_backoff(seconds):
        raise AssertionError(f"a permanent error was retried (backoff {seconds:.1f} s)")

    monkeypatch.setattr(common.retry, "backoff", no_backoff)
    with pytest.raises(Exception, match="s3://no-such-bucket/set"):
        open_split("s3://no-such-bucket/set", "train", retry=RetryPolicy(backoff_s=5.0))
    with pytest.raises(FileNotFoundError, match=f"reading s3://{BUCKET}/missing-object"):
        RetryPolicy(backoff_s=5.0).call(lambda: __import__("fsspec").filesystem("s3").cat_file(
            f"{BUCKET}/missing-object"), f"reading s3://{BUCKET}/missing-object")
    shard = read_manifest(s3_set).shards[0]
    no_faults.fault = lambda method, path, n: "403" if object_get(method, path) and ".tar" in path else None
    store = store_for(loader_cfg(s3_set, tmp_path / "cache", "retry_backoff_s=5"))
    try:
        with pytest.raises(PermissionError, match=f"downloading {s3_set}/{shard['name']}"):
            store.cache.path(shard["name"], shard["bytes"])
    finally:
        store.close()
    assert no_faults.faults == {"403": 1}


def test_make_shards_stops_on_an_unreadable_input_and_resumes_without_rejecting_it(s3, no_faults, small_shards,
                                                                                  tmp_path):
    """Inputs in s3://: one whose reads fail transiently on every try stops the run naming it (not a reject);
    healed, the rerun finishes with every video sharded, through failing writes."""
    import fsspec

    fs = fsspec.filesystem("s3")
    src = Path(small_shards).parent
    names = sorted(p for p in (src / "videos" / "val").rglob("*") if p.is_file())
    for p in names:
        fs.put_file(str(p), f"{BUCKET}/inputs/{p.name}")
    bad = names[0].name
    no_faults.fault = lambda method, path, n: "503" if method == "GET" and path.split("?")[0].endswith(bad) else None
    out = f"s3://{BUCKET}/from-s3"
    with pytest.raises(ShardsError, match=bad):
        make_shards({"val": f"s3://{BUCKET}/inputs"}, out, "retries=2", "shard.max_samples=1")
    assert no_faults.faults.get("503", 0) >= 2
    # healed inputs; writing the outputs now fails now and then (every third PUT): retried, the run completes
    no_faults.fault = lambda method, path, n: "503" if method == "PUT" and n % 3 == 0 else None
    no_faults.faults.clear()
    summary = make_shards({"val": f"s3://{BUCKET}/inputs"}, out, "retries=4", "shard.max_samples=1")
    assert summary["sharded"] == len(names) and summary["rejected"] == {}
    assert no_faults.faults.get("503", 0) >= 1
    verify(out, check_hashes=True)


def test_a_shards_rows_are_read_from_the_store_once_per_node(s3_set, no_faults, tmp_path):
    """Two processes of a node (two opens of the split and stores on one cache folder) read a shard's rows: the
    first with a ranged GET of samples.arrow, the second from the node's shard cache; another node reads them
    itself."""
    import numpy as np

    from pipeline.store import ShardStore

    gets = []
    no_faults.fault = lambda method, path, n: gets.append(path) if method == "GET" else None

    def process(node: str):
        index = open_split(s3_set, "train", cache_dir=str(tmp_path / node))
        index.use_cache(ShardStore(s3_set, str(tmp_path / node), cache_max_bytes=1 << 30).cache)
        return index

    first, second, other_node = process("node"), process("node"), process("other")

    def rows_gets(index, s):
        gets.clear()
        rows = index.shard_rows(s)
        return rows, [p for p in gets if "samples.arrow" in p]

    a, got = rows_gets(first, 3)
    assert got, "the first process reads the shard's rows from the store"
    b, got = rows_gets(second, 3)
    assert got == [], "the node's second process reads them from the node's cache"
    assert b.keys.to_pylist() == a.keys.to_pylist() and np.array_equal(b.offsets, a.offsets)
    assert np.array_equal(b.crc32, a.crc32) and np.array_equal(b.labels, a.labels)
    assert rows_gets(other_node, 3)[1], "another node has its own cache"
    assert first.keys == read_manifest(s3_set).split("train").column("key").to_pylist()


def test_cache_metrics_reach_the_loaders_endpoint(s3_set, tmp_path):
    import urllib.request

    from pipeline.loader import VideoLoader
    from train.config import MetricsConfig
    from train.metrics import build_metrics

    metrics = build_metrics(MetricsConfig(base_port=0, nvml=False, final_scrape_s=0), rank=0, local_rank=0, run="r")
    try:
        loader = VideoLoader(loader_cfg(s3_set, tmp_path / "cache"), on_batch=metrics.loader)
        it = iter(loader)
        for _ in range(3):
            next(it)
        loader.close()
        text = urllib.request.urlopen(metrics.url, timeout=10).read().decode()
    finally:
        metrics.close()
    values = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln.startswith("tubelet_loader_cache")}
    assert values["tubelet_loader_cache_misses_total"] >= 1
    assert values["tubelet_loader_cache_downloaded_bytes_total"] > 0
    assert values["tubelet_loader_cache_bytes"] > 0
    for name in ("hits", "evictions", "retries", "wait_seconds", "download_seconds"):
        assert f"tubelet_loader_cache_{name}_total" in values
