"""`make bench-loader`: what the shard format and the loader cost per clip, today's format against one stored at
the clips' sampling rate, and tubelet's loader against the PyAV reference and against what users would run
instead on the raw files (the official V-JEPA loader's decord path, torchcodec), all in one run.

    python -m benchmarks.bench_loader [videos=8] [seconds=10] [size=480x270] [fps=30] [batches=8] [workers=N]
                                      [inputs=[generated,reencoded]] [peers=[decord,torchcodec]]
                                      [data.<loader key>=value ...] [--json FILE]

1. Inputs, one set of rows per kind (`inputs`): "generated", `videos` H.264 files of `seconds` s at `size` and
   `fps` with moving textured content (`benchmarks.bench_shards.write_input`), written once into `cache`; and
   "reencoded", the same files re-encoded the way most users pre-resize a dataset: the ffmpeg CLI with its
   defaults (libx264, a keyframe every 250 frames, B-frames) to a short side of `reencode_short_side`.
2. Per kind, two shard sets of its files, made once with `make shards`' own code (VP9, short side 256, a keyframe
   every 16 stored frames): "today" (every frame, sides even: the format before frame_step and align) and
   "stepped" (transcode.frame_step = data.frame_stride, sides multiples of 16). Per set: bytes per video-second
   and the transcode's CPU seconds per video-second (the format's costs), the start-time granularity (its
   gain's price). Per kind, the raw files' size, bytes per video-second and frames between keyframes.
3. Loaders on the method's clips (data: 16x224x224, stride 4, batch 8; the V-JEPA masks of a tubelet_size x
   patch_size^2 grid), clips/s after one warm-up batch, decoded frames per clip and the peak memory of the
   loader's processes (PSS of this process and its children, above what this process held before the row):
   today's format + DALI; the stepped set + DALI, with random starts and with starts on keyframes
   (data.align_starts); the PyAV reference (DataLoader processes, seeking to the keyframe before each clip) on
   the stepped set; the peers (`benchmarks.peers`) on the raw files, same sampling, the official per-clip
   augmentation, the masks drawn in the workers. DALI's decoded frames are counted from the records and the
   keyframe interval (its decoder seeks to the keyframe at or before a clip's first frame); the reference counts
   what it decodes; for the peers, which do not tell, the least a seeking decoder decodes is shown (>=). DALI
   gets `workers` threads, the reference and the peers `workers` processes. A peer that is not installed (or
   does not load) has a row saying so.
4. Images (`images` > 0): generated JPEGs of `image_size`, sharded with `kind=image`; the DALI loader (the crop
   window decoded alone, then resized) against the PIL reference, same records, 1-frame clips.
5. Prints the versions, markdown tables, the ratios the format and the loaders are judged by (per input kind:
   tubelet stepped / each peer, today's format / each peer) and when sharding pays off (its CPU cost per video
   against the core-seconds per clip an epoch saves over the faster peer); `--json FILE` writes
   `{"rows": [{inputs, name, clips_per_s, decoded_frames_per_clip, peak_memory_bytes, ...}], "ratios": {...},
   "payoff": {...}, "versions": {...}, ...}`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing import forkserver
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import av
import numpy as np
import torch

from benchmarks.bench_shards import make_inputs
from benchmarks.peers import MODULES, PEERS, PeerLoader, availability, probe_raw
from common.cli import main_for
from common.config import ConfigError, check, load_config
from common.device import resolve_device
from common.files import atomic_path
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.reference import ReferenceLoader
from shards.build import run as make_shards
from shards.config import ShardsConfig
from shards.manifest import read_manifest

INPUT_KINDS = ("generated", "reencoded")


@dataclass
class BenchLoaderConfig:
    data: LoaderConfig = field(default_factory=LoaderConfig)  # the clips (data.root is set to each shard set)
    videos: int = 8  # generated inputs
    seconds: float = 10.0  # Kinetics' clip length
    size: str = "480x270"
    fps: int = 30
    inputs: List[str] = field(default_factory=lambda: list(INPUT_KINDS))  # kinds: generated, reencoded
    reencode_short_side: int = 256  # the "reencoded" kind: ffmpeg's defaults at this short side
    peers: List[str] = field(default_factory=lambda: list(PEERS))  # raw-file loaders: decord, torchcodec
    tubelet_size: int = 2  # the masks' token grid: num_frames / tubelet_size x (crop_size / patch_size)^2
    patch_size: int = 16
    cache: str = "data/bench/loader"  # inputs and shard sets, made once
    batches: int = 8  # batches timed per row, after one warm-up batch
    repeat: int = 1  # runs of every row, in rounds; a row's clips/s is its best run (on a shared machine: 3)
    workers: int = 0  # DALI threads and reference/peer DataLoader processes; 0 = the cores this process may use
    reference: bool = True  # also time the PyAV reference loader
    images: int = 96  # generated JPEGs for the image rows (0 = no image rows)
    image_size: str = "500x375"  # ImageNet's typical size
    image_batch: int = 32  # images per batch (I-JEPA trains with 128 per GPU)
    json: str = ""  # also write the rows as JSON here (`--json FILE` works too)

    def validate(self) -> None:
        check(self.videos >= 1 and self.seconds > 0 and self.fps >= 1, "videos", "videos, seconds, fps must be > 0")
        check("x" in self.size and all(p.isdigit() for p in self.size.split("x")), "size", "must be WxH, e.g. 480x270")
        check(self.batches >= 1 and self.repeat >= 1, "batches", "batches and repeat must be >= 1")
        check(self.workers >= 0, "workers", "must be >= 0")
        check(len(self.inputs) >= 1 and set(self.inputs) <= set(INPUT_KINDS), "inputs",
              f"must be a non-empty list of {', '.join(INPUT_KINDS)}, got {self.inputs}")
        check(set(self.peers) <= set(PEERS), "peers", f"must be a list of {', '.join(PEERS)}, got {self.peers}")
        check(self.reencode_short_side >= 16 and self.reencode_short_side % 2 == 0, "reencode_short_side",
              "must be an even number >= 16")
        check(self.tubelet_size >= 1 and self.patch_size >= 1 and self.data.num_frames % self.tubelet_size == 0
              and self.data.crop_size % self.patch_size == 0, "tubelet_size",
              "tubelet_size must divide data.num_frames and patch_size data.crop_size")


def reencode(paths: List[Path], short_side: int) -> List[Path]:
    """`paths` re-encoded once (into a folder beside theirs) as most users pre-resize a dataset: the ffmpeg CLI
    with its defaults (libx264 crf 23, preset medium, a keyframe every 250 frames, B-frames), short side
    `short_side`, no audio."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ConfigError("the reencoded inputs need the ffmpeg CLI: `make ffmpeg-tool` (apt-get install ffmpeg), "
                          "or inputs=[generated]", "inputs")
    out = paths[0].parent.with_name(f"{paths[0].parent.name}-ffmpeg{short_side}")
    out.mkdir(parents=True, exist_ok=True)
    s = short_side
    scale = f"scale='if(gt(iw,ih),-2,min(iw,{s}))':'if(gt(iw,ih),min(ih,{s}),-2)'"  # never upscaled
    done = []
    for src in paths:
        dst = out / src.name
        if not dst.exists():
            print(f"re-encoding {src} -> {dst}", file=sys.stderr)
            with atomic_path(dst) as tmp:
                subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", "-i", str(src), "-vf", scale,
                                "-an", "-f", "mp4", tmp], check=True)
        done.append(dst)
    return done


def raw_stats(paths: List[Path]) -> Dict:
    """What a raw-file reader gets: size, bytes per video-second, frames between keyframes, B-frames."""
    videos = [probe_raw(str(p)) for p in paths]
    seconds = sum(v.nframes / v.fps for v in videos)
    # frames between keyframes (the frame count when a video has one: its GOP is at least that long)
    gaps = [d for v in videos for d in (np.diff(v.keyframes) if len(v.keyframes) > 1 else [v.nframes])]
    return {"videos": videos, "size": f"{videos[0].width}x{videos[0].height}",
            "bytes_per_video_second": sum(p.stat().st_size for p in paths) / seconds,
            "video_seconds": seconds / len(paths), "keyframe_interval": float(np.mean(gaps)),
            "keyframes_per_video": float(np.mean([len(v.keyframes) for v in videos])),
            "b_frames": all(v.b_frames for v in videos)}


def shard_set(args: BenchLoaderConfig, name: str, inputs: Path, *overrides: str) -> Dict:
    """The shard set `name` of the inputs (made unless already complete); its format's costs."""
    out = Path(args.cache) / f"{inputs.name}-{name}"
    if not (out / "manifest.parquet").exists():
        cfg = load_config(ShardsConfig, None, [f"inputs.train={inputs}", f"output={out}", "progress=false",
                                               "transcode.keyframe_interval=16", *overrides])
        t0 = time.process_time()
        summary = make_shards(cfg)
        (out / "bench.json").write_text(json.dumps({"worker_cpu_seconds": summary["worker_cpu_seconds"],
                                                    "main_cpu_seconds": time.process_time() - t0}))
    m = read_manifest(str(out))
    seconds = sum(m.samples.column("duration").to_pylist())
    fps = m.samples.column("fps").to_pylist()
    cost = json.loads((out / "bench.json").read_text())
    t = m.transcode
    return {"root": str(out), "bytes_per_video_second": m.meta["summary"]["bytes"] / seconds,
            "transcode_cpu_per_video_second": cost["worker_cpu_seconds"] / seconds,
            "start_step_seconds": 1 / min(fps), "keyframe_seconds": t["keyframe_interval"] / min(fps),
            "size": f"{m.samples.column('width')[0]}x{m.samples.column('height')[0]}",
            "frame_step": t.get("frame_step", 1)}


def image_set(cache: str, count: int, size: str) -> Dict:
    """`count` generated JPEGs of `size` (WxH; ImageNet's typical 500x375), sharded with kind=image, in `cache`."""
    from PIL import Image

    from shards.synthetic.images import IMAGE_CLASSES, render_image

    w, h = (int(p) for p in size.split("x"))
    folder = Path(cache) / f"images-v1-{w}x{h}-x{count}"
    for i in range(count):
        path = folder / IMAGE_CLASSES[i % len(IMAGE_CLASSES)] / f"img{i:04d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_image(IMAGE_CLASSES[i % len(IMAGE_CLASSES)], h, w,
                                         np.random.default_rng(i))).save(path, quality=90)
    out = Path(cache) / f"{folder.name}-shards"
    if not (out / "manifest.parquet").exists():
        make_shards(load_config(ShardsConfig, None, [f"inputs.train={folder}", f"output={out}", "kind=image",
                                                     "labels_from_dirs=true", "progress=false"]))
    m = read_manifest(str(out))
    return {"root": str(out), "size": f"{w}x{h}", "images": len(m.samples),
            "bytes_per_image": m.meta["summary"]["bytes"] / len(m.samples)}


def tree_pss(pid: int) -> int:
    """Bytes of memory process `pid` and its descendants hold: the sum of their PSS (shared pages split among
    the processes sharing them, so forked workers are not counted twice); processes gone meanwhile count 0."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


class PeakMemory:
    """`with PeakMemory() as mem:` samples `tree_pss` of this process every `interval` s on a thread; `mem.added`
    is the peak above what the tree held on entry. A sample costs about 2 ms of kernel time per process (the
    kernel walks its page tables): every 20 ms, that took 12-14% off every row's clips/s on 2 cores."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.before, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss(os.getpid()))
            self._stop.wait(self.interval)

    @property
    def added(self) -> int:
        return max(0, self.peak - self.before)

    def __enter__(self) -> "PeakMemory":
        self.before = self.peak = tree_pss(os.getpid())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _row_child(send, fn, args) -> None:
    try:
        send.send(("ok", fn(*args)))
    except BaseException:  # noqa: B902 - everything goes back to the parent, which raises it
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


_SERVER: List[int] = []  # the fork server answered (row_processes)


def row_processes(peers: Sequence[str] = ()):
    """The multiprocessing context the rows run in: its fork server, started here once, a process that imported
    the loaders, DALI and the `peers` that load, and runs nothing else. Forked from it, a row never inherits the
    thread pools (OpenMP's, DALI's, a decoder's) or a CUDA context of this process, which a plain fork could
    deadlock on, and starts without importing (the libraries' code is not in its memory)."""
    ctx = mp.get_context("forkserver")
    # what the rows use (not this module itself: run as __main__, a row imports it afresh, at no cost then)
    ctx.set_forkserver_preload(["pipeline.loader", "pipeline.reference", "benchmarks.peers", "nvidia.dali.fn",
                                *(MODULES[p] for p in peers if availability(p)[0] is not None)])
    if not _SERVER:
        forkserver.ensure_running()
        first = ctx.Process(target=int)  # served once the server has imported: rows then measure only themselves
        first.start()
        first.join()
        _SERVER.append(first.exitcode)
    return ctx


def isolated(fn, *args) -> Dict:
    """`fn(*args)` (a row: a dict) in a process of its own (`row_processes`), with `peak_memory_bytes`: what the
    row's processes added to this process tree's memory at their peak (this process waits meanwhile). Each row
    thus starts from the same state, none pays for another's leftovers, and a decoder that crashes costs its row,
    not the run."""
    ctx = row_processes()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_row_child, args=(send, fn, args))
    with PeakMemory() as mem:
        proc.start()
        send.close()
        try:
            status, result = recv.recv()
        except EOFError:  # it died without answering
            proc.join()
            return {"error": f"its process died (exit code {proc.exitcode})", "clips_per_s": None,
                    "decoded_frames_per_clip": None, "peak_memory_bytes": mem.added}
        proc.join()
    if status == "error":
        raise RuntimeError(f"a benchmark row failed in its process:\n{result}")
    return dict(result, peak_memory_bytes=mem.added)


def time_loader(batches, n: int, decoded) -> Dict:
    """clips/s over `n` batches after one warm-up batch; `decoded(batch)` -> frames decoded for it."""
    it = iter(batches)
    decoded(next(it))  # the warm-up batch: counted apart (the reference's counter is cumulative)
    clips = frames = 0
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(it)
        clips += b.clips.shape[0]
        frames += decoded(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if hasattr(it, "close"):  # a generator over a DataLoader: its workers are shut down now, not at exit
        it.close()
    return {"clips_per_s": clips / seconds, "decoded_frames_per_clip": frames / clips, "clips": clips}


def counted(counter):
    """`decoded(batch)` for a loader whose `counter()` is cumulative: the frames decoded since the last call."""
    seen = {"frames": 0}

    def decoded(_batch) -> int:
        frames, seen["frames"] = counter() - seen["frames"], counter()
        return frames

    return decoded


def dali_row(cfg: LoaderConfig, n: int, grid=None) -> Dict:
    loader = VideoLoader(cfg, grid=grid)
    try:
        op = "image_slice" if loader.images else "video"
        return {"loader": f"DALI decoders.{op} {'mixed' if loader.device.type == 'cuda' else 'cpu'}, "
                          f"{loader.threads} threads", **time_loader(loader, n, loader.decoded_frames)}
    finally:
        loader.close()


def reference_row(cfg: LoaderConfig, n: int, workers: int, grid=None) -> Dict:
    ref = ReferenceLoader(cfg, workers=workers, grid=grid)
    what = "PIL" if ref.index.kind == "image" else "PyAV"
    return {"loader": f"{what} + torch, DataLoader {workers} processes",
            **time_loader(ref.batches(n + 1), n, counted(lambda: ref.decoded_frames))}


PEER_ROWS = {"decord": ("decord, as the official V-JEPA loader, raw files", "VideoReader(num_threads=-1) + get_batch"),
             "torchcodec": ("torchcodec, raw files", 'VideoDecoder(seek_mode="approximate") + get_frames_at')}


def peer_row(peer: str, videos, cfg: LoaderConfig, n: int, workers: int, grid) -> Dict:
    loader = PeerLoader(peer, videos, cfg, grid=grid, workers=workers)
    timed = time_loader(loader.batches(n + 1), n, counted(lambda: loader.min_decoded_frames))
    return {"loader": f"{peer} {loader.version} {PEER_ROWS[peer][1]}, official transform, DataLoader {workers} "
                      "processes", **timed, "decoded_frames_per_clip": None,
            "min_decoded_frames_per_clip": timed["decoded_frames_per_clip"]}


@dataclass
class Row:
    """A row to time: `fn(*args)` in a process of its own (`isolated`), named and described by `about`; or, with
    `missing`, a row that says why it has no numbers (a peer not installed)."""

    name: str
    about: Dict
    fn: Optional[Callable] = None
    args: tuple = ()
    missing: Optional[Dict] = None


def peer(name: str, videos, cfg: LoaderConfig, n: int, workers: int, grid, **about) -> Row:
    """A peer's row on the raw files, or a row saying why there is none (not installed, does not load)."""
    version, why = availability(name)
    about = dict(about, peer=name, version=version)
    if version is None:
        return Row(PEER_ROWS[name][0], about, missing={"loader": f"{name}: {why}", "error": why, "clips_per_s": None,
                                                       "decoded_frames_per_clip": None, "peak_memory_bytes": None})
    return Row(PEER_ROWS[name][0], about, peer_row, (name, videos, cfg, n, workers, grid))


def run_rows(specs: List[Row], repeat: int) -> List[Dict]:
    """Every row `repeat` times, in rounds (row after row, then again: a machine busy for a while slows one run of
    many rows, not every run of one); per row the run of the most clips/s (a busy machine only ever slows a run),
    the clips/s of every run, the largest peak memory."""
    runs: List[List[Dict]] = [[] for _ in specs]
    for _ in range(repeat):
        for spec, got in zip(specs, runs):
            if spec.missing is None:
                got.append(isolated(spec.fn, *spec.args))
                print(f"{spec.about.get('inputs', '')}: {spec.name}: "
                      f"{_fmt(got[-1]['clips_per_s'], '.1f', got[-1].get('error', ''))} clips/s", file=sys.stderr,
                      flush=True)
    rows = []
    for spec, got in zip(specs, runs):
        if spec.missing is not None:
            rows.append({"name": spec.name, **spec.about, **spec.missing})
            continue
        best = max(got, key=lambda r: r["clips_per_s"] or 0)
        rows.append({"name": spec.name, **spec.about, **best, "clips_per_s_runs": [r["clips_per_s"] for r in got],
                     "peak_memory_bytes": max(r["peak_memory_bytes"] for r in got)})
    return rows


def versions(peers: Sequence[str]) -> Dict[str, str]:
    import nvidia.dali

    v = {"python": platform.python_version(), "torch": torch.__version__, "dali": nvidia.dali.__version__,
         "pyav": av.__version__, "libavcodec (PyAV)": ".".join(map(str, av.library_versions["libavcodec"]))}
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        v["ffmpeg CLI"] = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split()[2]
    for p in peers:
        version, why = availability(p)
        v[p] = version or why
    return v


def bench(args: BenchLoaderConfig) -> List[Dict]:
    workers = args.workers or len(os.sched_getaffinity(0))
    w, h = (int(p) for p in args.size.split("x"))
    generated = make_inputs(Path(args.cache), args.videos, args.seconds, w, h, args.fps)
    files = {"generated": generated}
    if "reencoded" in args.inputs:
        files["reencoded"] = reencode(generated, args.reencode_short_side)
    c = args.data
    step = c.frame_stride
    grid = (c.num_frames // args.tubelet_size, c.crop_size // args.patch_size, c.crop_size // args.patch_size)
    base = replace(c, threads=workers)
    print(f"inputs: {args.videos} x {args.seconds:g} s {args.size} {args.fps} fps ({', '.join(args.inputs)}) in "
          f"{args.cache}", file=sys.stderr)
    sets: Dict[str, Dict] = {}
    specs: List[Row] = []
    for kind in args.inputs:
        folder = files[kind][0].parent
        raw = raw_stats(files[kind])
        today = shard_set(args, "today", folder, "transcode.align=2")
        stepped = shard_set(args, f"step{step}", folder, f"transcode.frame_step={step}", "transcode.align=16")
        sets[kind] = {"raw": {k: v for k, v in raw.items() if k != "videos"}, "today": today, "stepped": stepped}
        on_today, on_stepped = replace(base, root=today["root"]), replace(base, root=stepped["root"])
        n = args.batches
        specs += [Row("today's format, DALI", dict(inputs=kind, set="today"), dali_row, (on_today, n, grid)),
                  Row(f"stored every {step}th frame, DALI", dict(inputs=kind, set="stepped"), dali_row,
                      (on_stepped, n, grid)),
                  Row(f"stored every {step}th frame, DALI, starts on keyframes", dict(inputs=kind, set="stepped"),
                      dali_row, (replace(on_stepped, align_starts=True), n, grid))]
        if args.reference:
            specs.append(Row(f"stored every {step}th frame, PyAV reference", dict(inputs=kind, set="stepped"),
                             reference_row, (on_stepped, n, workers, grid)))
        specs += [peer(p, raw["videos"], base, n, workers, grid, inputs=kind, set="raw") for p in args.peers]
    if args.images:
        sets["images"] = image_set(args.cache, args.images, args.image_size)
        images = replace(base, root=sets["images"]["root"], num_frames=1, frame_stride=1, batch_size=args.image_batch)
        same = dict(inputs="images", set="images")
        specs.append(Row("images (JPEG), DALI", same, dali_row, (images, args.batches)))
        if args.reference:
            specs.append(Row("images (JPEG), PIL reference", same, reference_row, (images, args.batches, workers)))
    row_processes(args.peers)
    rows = run_rows(specs, args.repeat)
    ratios, payoff = judge(args, rows, sets, workers)
    report(args, rows, sets, ratios, payoff, workers, versions(args.peers))
    return rows


def judge(args: BenchLoaderConfig, rows: List[Dict], sets: Dict, workers: int):
    """Per input kind: tubelet's rows over each peer's, and after how many epochs sharding pays off against the
    faster peer (its transcode CPU per video against the core-seconds per clip each epoch saves; one clip per
    video per epoch, the loaders using `workers` cores)."""
    step = args.data.frame_stride
    ratios, payoff = {}, {}
    for kind in args.inputs:
        mine = {r["name"]: r for r in rows if r["inputs"] == kind}
        today, stepped = mine["today's format, DALI"], mine[f"stored every {step}th frame, DALI"]
        peers = {r["peer"]: r["clips_per_s"] for r in mine.values() if r.get("peer")}
        ratios[kind] = {}
        for p, rate in peers.items():
            ratios[kind][f"stepped/{p}"] = stepped["clips_per_s"] / rate if rate else None
            ratios[kind][f"today/{p}"] = today["clips_per_s"] / rate if rate else None
        running = {p: r for p, r in peers.items() if r}
        if running:
            fastest = max(running, key=running.get)
            video_s = sets[kind]["raw"]["video_seconds"]
            shard_cpu = sets[kind]["stepped"]["transcode_cpu_per_video_second"] * video_s
            peer_cost, mine_cost = workers / running[fastest], workers / stepped["clips_per_s"]
            saved = peer_cost - mine_cost
            payoff[kind] = {"faster_peer": fastest, "video_seconds": video_s,
                            "shard_cpu_s_per_video": shard_cpu, "peer_core_s_per_clip": peer_cost,
                            "tubelet_core_s_per_clip": mine_cost,
                            "epochs": shard_cpu / saved if saved > 0 else None}
    return ratios, payoff


def _fmt(v, spec: str = ".1f", empty: str = "") -> str:
    return empty if v is None else format(v, spec)


def report(args: BenchLoaderConfig, rows, sets, ratios, payoff, workers: int, vers: Dict[str, str]) -> None:
    c = args.data
    device = resolve_device(c.device).type
    print(f"\nloaders on {c.num_frames}x{c.crop_size}x{c.crop_size} clips, stride {c.frame_stride}, batch "
          f"{c.batch_size}, {c.dtype} (the peers: float32, as the official loader), masks on a "
          f"{c.num_frames // args.tubelet_size}x{c.crop_size // args.patch_size}x{c.crop_size // args.patch_size} "
          f"grid; {workers} DALI threads / DataLoader processes; {platform.node()}, "
          f"{len(os.sched_getaffinity(0))} cores, device {device}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "\n")
    print("| inputs | raw files | raw bytes per video-second | frames between keyframes | B-frames |\n"
          "|---|---|---|---|---|")
    for kind in args.inputs:
        r = sets[kind]["raw"]
        print(f"| {kind} | {r['size']} | {r['bytes_per_video_second'] / 1e3:.0f} kB | "
              f"{r['keyframe_interval']:.0f} ({r['keyframes_per_video']:.1f} keyframes per video) | "
              f"{'yes' if r['b_frames'] else 'no'} |")
    print("\n| inputs | set | stored size | bytes per video-second | transcode CPU s per video-second | start step | "
          "keyframes |\n|---|---|---|---|---|---|---|")
    for kind in args.inputs:
        for name in ("today", "stepped"):
            s = sets[kind][name]
            print(f"| {kind} | {name} (frame_step {s['frame_step']}) | {s['size']} | "
                  f"{s['bytes_per_video_second'] / 1e3:.0f} kB | {s['transcode_cpu_per_video_second']:.2f} | "
                  f"{1000 * s['start_step_seconds']:.0f} ms | every {1000 * s['keyframe_seconds']:.0f} ms |")
    print("\n| inputs | loader | path | clips/s | decoded frames per clip | peak memory |\n|---|---|---|---|---|---|")
    for r in rows:
        frames = (_fmt(r["decoded_frames_per_clip"]) if r.get("min_decoded_frames_per_clip") is None
                  else f">= {r['min_decoded_frames_per_clip']:.1f}")
        memory = _fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2 ** 20, ".0f")
        rate = _fmt(r["clips_per_s"], ".1f", r.get("error", ""))
        print(f"| {r['inputs']} | {r['name']} | {r.get('loader', '')} | {rate} | "
              f"{frames} | {memory + ' MiB' if memory else ''} |")
    print()
    step = c.frame_stride
    for kind in args.inputs:
        mine = {r["name"]: r for r in rows if r["inputs"] == kind}
        today, stepped = mine["today's format, DALI"], mine[f"stored every {step}th frame, DALI"]
        line = f"{kind}: stepped / today (DALI) {stepped['clips_per_s'] / today['clips_per_s']:.2f}x"
        if args.reference:
            ref = mine[f"stored every {step}th frame, PyAV reference"]
            line += f", DALI / reference (stepped) {stepped['clips_per_s'] / ref['clips_per_s']:.2f}x"
        for key, v in ratios[kind].items():
            line += f", tubelet {key} {_fmt(v, '.2f', 'n/a')}{'x' if v is not None else ''}"
        print(line)
    for kind, p in payoff.items():
        epochs = f"after {p['epochs']:.1f} epochs" if p["epochs"] is not None else "never (tubelet is not faster)"
        print(f"{kind}: sharding costs {p['shard_cpu_s_per_video']:.1f} CPU-s per {p['video_seconds']:.0f} s video "
              f"once; an epoch reads a clip per video for {p['tubelet_core_s_per_clip']:.3f} core-s (tubelet "
              f"stepped) instead of {p['peer_core_s_per_clip']:.3f} ({p['faster_peer']}): it pays off {epochs}")
    if args.images and args.reference:
        img = {r["name"]: r for r in rows if r["set"] == "images"}
        dali_img, ref_img = img["images (JPEG), DALI"], img["images (JPEG), PIL reference"]
        print(f"images: DALI / reference ({sets['images']['size']}, {sets['images']['bytes_per_image'] / 1e3:.0f} kB "
              f"each, 1x{c.crop_size}x{c.crop_size}, batch {args.image_batch}): "
              f"{dali_img['clips_per_s'] / ref_img['clips_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clip": [c.num_frames, c.crop_size, c.crop_size], "stride": c.frame_stride,
                       "batch": c.batch_size, "workers": workers, "device": device, "versions": vers, "sets": sets,
                       "rows": rows, "ratios": ratios, "payoff": payoff}, f, indent=2)
        print(f"wrote {args.json}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchLoaderConfig, bench, argv, prog="python -m benchmarks.bench_loader",
                    doc=__doc__, flags={"--json": "json"})


if __name__ == "__main__":
    raise SystemExit(main())
