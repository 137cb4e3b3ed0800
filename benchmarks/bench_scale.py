"""What a rank pays at start on a big shard set, and what the offline merge costs: `make bench-scale`.

    python -m benchmarks.bench_scale rows=1000000 [per_shard=1000] [dir=/tmp/tubelet-scale] [today=CHECKOUT]
        [s3=true] [--json FILE]

Builds a synthetic set of `rows` samples the way `make shards` leaves one before its merge: a list file of `rows`
inputs, its listing and the group records of its plan (`_parts/`, 1,000 samples per shard), sparse tar shards of the
recorded sizes (`truncate`: no disk), and real DALI index files; then runs, each in a fresh process on the code of
this checkout (and, with `today=`, of another checkout, e.g. a worktree at main, on a copy of the set linked to the
same shards): a partition job's start (1 of 1,000, its groups finished), the merge (`make shards merge=true`: time,
peak RSS), verify with sizes only (`tubelet-verify`), opening the train split (time, RSS kept), loader start to the
first plan step (time, peak RSS, bytes read by read(2)), the plan's time per step and per epoch (a new epoch's order),
and with `s3=true` opening through a local S3 server (moto) behind a counting proxy: requests and bytes at start, per
rank and for a node's second rank. RSS figures are the process's own (VmRSS, VmHWM from /proc/self/status) above its
baseline after imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from common.cli import main_for

HERE = Path(__file__).resolve().parents[1]


@dataclass
class BenchScaleConfig:
    rows: int = 100_000  # samples in the synthetic set
    per_shard: int = 1000  # samples per shard
    video_bytes: int = 400_000  # recorded size of each video member (sparse: costs no disk)
    dir: str = "/tmp/tubelet-scale"  # where the sets are built (kept between runs: a set is built once)
    today: str = ""  # another checkout (e.g. a worktree at main) measured on the same set: "today's" column
    s3: bool = False  # also open the set through a local S3 server and count requests and bytes
    steps: int = 200  # plan steps timed
    batch: int = 32
    world: int = 8  # the plan of rank 0 of `world` ranks on one node
    json: str = ""  # also write the results as JSON here (`--json FILE` works too)


# -- the synthetic set -------------------------------------------------------------------------------

def _shards_args(root: Path, listing: Path, per_shard: int, merge: bool) -> List[str]:
    return [f"inputs.train={listing}", f"output={root}", f"shard.max_samples={per_shard}", "progress=false",
            f"merge={'true' if merge else 'false'}", "check_outputs=size"]


def build(cfg: BenchScaleConfig) -> Path:
    """The set of `cfg.rows` samples in `cfg.dir`, finished up to its merge (built once; later runs reuse it)."""
    from common.config import load_config
    from shards.config import ShardsConfig
    from shards.output import Output
    from shards.plan import fingerprint, plan
    from shards.wds import Member, format_index

    root = Path(cfg.dir) / f"rows-{cfg.rows}"
    done = root / "_parts" / ".complete"
    listing = root.parent / f"list-{cfg.rows}.csv"
    scfg = load_config(ShardsConfig, None, _shards_args(root, listing, cfg.per_shard, False))
    if done.exists():
        plan(scfg, Output(str(root)))  # a set built before listings were kept gets one
        return root
    (root / "_parts").mkdir(parents=True, exist_ok=True)
    with open(listing, "w") as f:
        f.write("path,label\n")
        for i in range(cfg.rows):
            f.write(f"/synthetic/v{i:09d}.mp4,class{i * 400 // cfg.rows:03d}\n")
    for g in plan(scfg, Output(str(root))).groups():  # the listing (`_parts/inputs/`), as a partition job leaves it
        name = g.name
        at, rows, members = 0, [], []
        for k, (src, key, label_index) in enumerate(zip(g.sources, g.keys, g.label_index)):
            size = cfg.video_bytes + (k % 7) * 1000
            video, js, nf, cl = at + 512, None, None, None
            at = video + -(-size // 512) * 512
            js, at = at + 512, at + 1024
            nf, at = at + 512, at + 1024
            cl, at = at + 512, at + 1024
            members.append([Member("mp4", video, size, f"{key}.mp4"), Member("json", js, 200, f"{key}.json"),
                            Member("nframes", nf, 4, f"{key}.nframes"), Member("cls", cl, 3, f"{key}.cls")])
            rows.append({"key": key, "split": g.split, "shard": f"{name}.tar", "index": k, "ext": "mp4",
                         "video_offset": video, "video_size": size, "video_crc32": k, "json_offset": js,
                         "json_size": 200, "nframes_offset": nf, "nframes_size": 4, "cls_offset": cl, "cls_size": 3,
                         "source": src.url, "source_bytes": size, "duration": 10.0, "fps": 8.0, "nframes": 80,
                         "width": 256, "height": 256, "codec": "vp9", "label": src.label,
                         "label_index": label_index, "rotation": 0, "vfr": False})
        size = -(-(at + 1024) // 10240) * 10240
        with open(root / f"{name}.tar", "wb") as f:
            f.truncate(size)
        (root / f"{name}.idx").write_text(format_index(members))
        shard = {"name": f"{name}.tar", "index": f"{name}.idx", "split": g.split, "bytes": size,
                 "samples": len(rows), "sha256": "0" * 64}
        record = {"group": name, "split": g.split, "fingerprint": fingerprint(scfg, g), "shards": [shard],
                  "samples": rows, "rejects": [], "source_seconds": 10.0 * len(rows), "cpu_seconds": 0.0}
        (root / "_parts" / f"{name}.json").write_text(json.dumps(record))
    done.write_text("")
    return root


def linked_copy(root: Path, name: str) -> Path:
    """A second set folder whose shards, index files and records are links to `root`'s: another code's merge
    writes its own manifest there."""
    other = root.parent / f"{root.name}-{name}"
    if not (other / "_parts").exists():
        (other / "_parts").mkdir(parents=True)
        for p in root.iterdir():
            if p.suffix in (".tar", ".idx"):
                os.symlink(p, other / p.name)
        for p in (root / "_parts").iterdir():
            os.symlink(p, other / "_parts" / p.name)
    return other


# -- measurements, each in a fresh process ---------------------------------------------------------

def _status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(ln for ln in f if ln.startswith("rchar")).split()[1])


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM from now on
        f.write("5")


def measure(what: str, root: str, listing: str, per_shard: int, steps: int, batch: int, world: int) -> Dict:
    """One measurement in this process (run by `_child`): its numbers as a dict."""
    import gc

    from common.config import load_config
    from pipeline.config import LoaderConfig
    from pipeline.split_index import open_split, plan_for

    if what in ("partition", "merge"):  # a partition job of 1,000 (its groups finished: no transcode), the merge
        import logging

        from shards.build import run
        from shards.config import ShardsConfig

        logging.disable(logging.INFO)  # the run's summary lines are not what is measured
        args = _shards_args(Path(root), Path(listing), per_shard, what == "merge")
        if what == "partition":
            args += ["partition.count=1000", "partition.index=0"]
        else:  # the manifest of an earlier merge removed
            for name in ("manifest.parquet", "samples.arrow"):
                if os.path.exists(os.path.join(root, name)):
                    os.unlink(os.path.join(root, name))
        cfg = load_config(ShardsConfig, None, args)
        base = _status()["VmRSS"]
        _reset_peak()
        t0 = time.perf_counter()
        run(cfg)
        out = {"seconds": time.perf_counter() - t0, "peak_rss": _status()["VmHWM"] - base}
        if what == "merge":
            out["files_bytes"] = {n: os.path.getsize(os.path.join(root, n)) for n in os.listdir(root)
                                  if n.endswith((".parquet", ".arrow"))}
        return out
    if what == "verify":
        from shards.manifest import read_manifest, verify

        base = _status()["VmRSS"]
        _reset_peak()
        t0 = time.perf_counter()
        # an older checkout's verify takes the whole manifest (read_manifest: every sample's row)
        verify(read_manifest(root) if "manifest" in verify.__code__.co_varnames[:1] else root)
        return {"seconds": time.perf_counter() - t0, "peak_rss": _status()["VmHWM"] - base}
    from pipeline.loader import VideoLoader  # imported before the baseline: torch is not the set's cost

    cfg = load_config(LoaderConfig, None, [f"root={root}", f"batch_size={batch}", "split=train", "num_frames=16",
                                           "frame_stride=4", "cache_dir=" + os.environ.get("BENCH_CACHE", "")])
    gc.collect()
    base, rchar = _status()["VmRSS"], _rchar()
    _reset_peak()
    t0 = time.perf_counter()
    if what == "open":
        index = open_split(cfg.root, cfg.split, retry=cfg.retry_policy(),
                           **({"cache_dir": cfg.cache_dir} if "cache_dir" in open_split.__code__.co_varnames else {}))
        seconds = time.perf_counter() - t0
        gc.collect()
        return {"seconds": seconds, "rss_kept": _status()["VmRSS"] - base, "peak_rss": _status()["VmHWM"] - base,
                "read_bytes": _rchar() - rchar, "rows": len(index)}
    loader = VideoLoader(cfg, grid=(8, 14, 14), world_size=world, local_world_size=world)
    plan = plan_for(loader.index, cfg, world_size=world, ranks_per_node=world)
    plan.load_state_dict(loader.state_dict())
    first = next(plan)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_rss": _status()["VmHWM"] - base, "read_bytes": _rchar() - rchar,
           "first_rows": len(first.rows)}
    gc.collect()
    out["rss_kept"] = _status()["VmRSS"] - base
    for shuffle in ("global", "window"):
        p = plan_for(loader.index, load_config(LoaderConfig, None, [f"root={root}", f"batch_size={batch}",
                                                                    f"shuffle={shuffle}", "split=train"]),
                     world_size=world, ranks_per_node=world)
        next(p)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(p)
        out[f"{shuffle}_step_ms"] = (time.perf_counter() - t0) / steps * 1e3
        t0 = time.perf_counter()
        p._item_order(p.epoch + 1)  # a new epoch's order, as at an epoch boundary
        out[f"{shuffle}_epoch_order_s"] = time.perf_counter() - t0
    return out


def _child(code: Path, what: str, root: Path, listing: Path, cfg: BenchScaleConfig,
           env: Optional[Dict[str, str]] = None) -> Dict:
    """`measure(what, ...)` in a fresh interpreter on the code of checkout `code` (this file's function, that
    checkout's modules)."""
    script = (f"import importlib.util, json, sys; sys.path.insert(0, {str(code)!r});"
              f"spec = importlib.util.spec_from_file_location('bench_scale_here', {__file__!r});"
              "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod);"
              f"print('RESULT ' + json.dumps(mod.measure({what!r}, {str(root)!r}, {str(listing)!r}, {cfg.per_shard},"
              f" {cfg.steps}, {cfg.batch}, {cfg.world})))")
    full = dict(os.environ, PYTHONPATH=str(code), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(code), env=full, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(line[-1][len("RESULT "):])


def s3_start(root: Path, cfg: BenchScaleConfig) -> Dict:
    """This checkout's start through a local S3 server behind a counting proxy: the set's metadata files uploaded
    (the shards are not read at start), two ranks of one node opening the split and planning a step."""
    import tempfile

    from benchmarks.s3 import CREDENTIALS, FaultyProxy, S3Server, s3_env

    server = S3Server()
    proxy = FaultyProxy(server.endpoint, lambda *a: None)
    try:
        with s3_env(server.endpoint):
            import fsspec

            fs = fsspec.filesystem("s3")
            fs.mkdir("scale")
            for name in ("manifest.parquet", "samples.arrow", "rejects.parquet"):
                fs.put_file(str(root / name), f"scale/set/{name}")
        cache = tempfile.mkdtemp(prefix="scale-cache-")
        env = {"BENCH_CACHE": cache, "AWS_ENDPOINT_URL": proxy.endpoint, **CREDENTIALS}
        out = {}
        for rank in ("first_rank", "second_rank"):  # the second finds the node's copy of the manifest
            before, bytes0 = proxy.requests, proxy.bytes_sent
            out[rank] = _child(HERE, "open", "s3://scale/set", Path(""), cfg, env)
            out[rank].update(requests=proxy.requests - before, bytes=proxy.bytes_sent - bytes0)
        return out
    finally:
        proxy.stop()
        server.stop()


def bench(cfg: BenchScaleConfig) -> Dict:
    t0 = time.perf_counter()
    root = build(cfg)
    listing = root.parent / f"list-{cfg.rows}.csv"
    print(f"set of {cfg.rows:,} samples in {-(-cfg.rows // cfg.per_shard):,} shards: {root} "
          f"({time.perf_counter() - t0:.0f} s to build)", flush=True)
    codes = {"new": (HERE, root)}
    if cfg.today:
        codes["today"] = (Path(cfg.today).resolve(), linked_copy(root, "today"))
    result: Dict = {"rows": cfg.rows, "shards": -(-cfg.rows // cfg.per_shard)}
    for name, (code, where) in codes.items():
        r = result[name] = {}
        for what in ("partition", "merge", "verify", "open", "first_step"):
            r[what] = _child(code, what, where, listing, cfg)
            print(f"{name:>5} {what:<10} {json.dumps(r[what])}", flush=True)
    if cfg.s3:
        result["new"]["s3"] = s3_start(root, cfg)
        print(f"  new s3         {json.dumps(result['new']['s3'])}", flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {cfg.json}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchScaleConfig, bench, argv, prog="python -m benchmarks.bench_scale", doc=__doc__,
                    flags={"--json": "json"})


if __name__ == "__main__":
    raise SystemExit(main())
