"""Benchmark of `make shards`: tubelet's transcode against the `ffmpeg` CLI, and worker scaling.

    python -m benchmarks.bench_shards [videos=8 seconds=6 size=640x360 fps=30 codec=vp9 workers=[1,N]
                                       cache=data/bench results=data/bench/results.json]

1. Inputs: `videos` H.264 mp4 files of `seconds` s at `size`, `fps`, with moving textured content
   (a panning textured background and moving objects), written once with PyAV into `cache`.
2. (a) tubelet: `shards.transcode.process` over the inputs in this process, one at a time (read, decode,
   resize, encode, decode-back validation); CPU = time.process_time(). `validate_video` is timed apart.
   (b) ffmpeg: the same transcode with the `ffmpeg` CLI, one process per video, the same libvpx-vp9 (or
   libx264) settings as `shards.transcode._encoder`, one decoder and one encoder thread, bicubic scale
   to the same size; CPU = getrusage(RUSAGE_CHILDREN).
   (c) `shards.build.run` end to end for each worker count in `workers`.
3. Prints a markdown table and writes JSON to `results`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import av
import numpy as np

from common.cli import main_for
from common.config import check, load_config
from common.files import atomic_path
from shards import transcode as tc
from shards.config import FilterConfig, ShardsConfig, TranscodeConfig

GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# inputs


def _texture(h: int, w: int, rng) -> np.ndarray:
    """A natural-looking texture: smooth colour blobs + gradients + fine grain."""
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    big = np.repeat(np.repeat(small, 16, 0), 16, 1)[:h, :w]
    k = np.ones(15, np.float32) / 15  # separable box blur softens the blocks
    big = np.apply_along_axis(lambda v: np.convolve(v, k, "same"), 0, big)
    big = np.apply_along_axis(lambda v: np.convolve(v, k, "same"), 1, big)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = 40 * np.sin(x / 7.0 + y / 11.0)[..., None]
    grain = rng.normal(0, 6, (h, w, 3))
    return np.clip(big * 0.7 + stripes + grain + 20, 0, 255).astype(np.uint8)


def write_input(path: Path, seconds: float, w: int, h: int, fps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    pan = 3  # pixels per frame
    tex = _texture(h + 64, w + pan * n + 64, rng)
    objs = [(rng.integers(20, 80), rng.uniform(-6, 6), rng.uniform(-4, 4), _texture(96, 96, rng))
            for _ in range(3)]
    with atomic_path(path) as tmp, av.open(tmp, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "veryfast", "crf": "20"}
        for i in range(n):
            img = tex[16:16 + h, i * pan:i * pan + w].copy()
            for size, vx, vy, otex in objs:
                x = int((w / 3 + vx * i) % (w - size))
                y = int((h / 3 + vy * i) % (h - size))
                img[y:y + size, x:x + size] = otex[:size, :size]
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def make_inputs(cache: Path, count: int, seconds: float, w: int, h: int, fps: int) -> list:
    d = cache / f"inputs-v{GENERATOR_VERSION}-{w}x{h}-{fps}fps-{seconds:g}s"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = d / f"clip{i:03d}.mp4"
        if not p.exists():
            print(f"writing {p}", file=sys.stderr)
            write_input(p, seconds, w, h, fps, seed=i)
        paths.append(p)
    return paths


def probe(path: Path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.width, s.codec_context.height, float(s.duration * s.time_base)


# ----------------------------------------------------------------------------------------------------
# (a) tubelet in-process, (b) ffmpeg CLI


def tubelet_once(path: Path, cfg: TranscodeConfig) -> dict:
    """One in-process `process` call: CPU and wall, with `validate_video` timed apart."""
    timed = {"cpu": 0.0, "wall": 0.0}
    original = tc.validate_video

    def timed_validate(*a, **k):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            timed["cpu"] += time.process_time() - c0
            timed["wall"] += time.perf_counter() - w0

    tc.validate_video = timed_validate
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        r = tc.process(tc.Job(path.stem, str(path), None, None, cfg, FilterConfig()))
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        tc.validate_video = original
    assert isinstance(r, tc.Sample), r
    return {"cpu_s": cpu, "wall_s": wall, "validate_cpu_s": timed["cpu"], "validate_wall_s": timed["wall"],
            "out_bytes": len(r.video), "frames": r.meta["nframes"], "size": f"{r.meta['width']}x{r.meta['height']}"}


def ffmpeg_args(src: Path, dst: Path, cfg: TranscodeConfig, w: int, h: int) -> list:
    """The transcode of shards.transcode with the ffmpeg CLI: same encoder settings, one thread each."""
    ow, oh = tc._output_size(w, h, cfg.short_side, cfg.align)
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", "-threads", "1", "-i", str(src),
            "-an", "-sn", "-dn", "-filter_threads", "1", "-vf", f"scale={ow}:{oh}:flags=bicubic",
            "-pix_fmt", "yuv420p", "-g", str(cfg.keyframe_interval), "-threads", "1"]
    if cfg.codec == "vp9":
        args += ["-c:v", "libvpx-vp9", "-crf", str(cfg.crf), "-b:v", "0", "-cpu-used", str(cfg.speed),
                 "-deadline", "good", "-keyint_min", str(cfg.keyframe_interval), "-row-mt", "0", "-f", "webm"]
    else:
        k = cfg.keyframe_interval
        args += ["-c:v", "libx264", "-crf", str(cfg.crf), "-preset", tc.X264_PRESETS[cfg.speed],
                 "-x264-params", f"keyint={k}:min-keyint={k}:scenecut=0", "-f", "mp4"]
    return args + [str(dst)]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ffmpeg_once(path: Path, cfg: TranscodeConfig, workdir: Path) -> dict:
    w, h, _ = probe_cache[path]
    dst = workdir / f"{path.stem}.{tc.CONTAINER[cfg.codec][0]}"
    c0, w0 = _children_cpu(), time.perf_counter()
    subprocess.run(ffmpeg_args(path, dst, cfg, w, h), check=True)
    cpu, wall = _children_cpu() - c0, time.perf_counter() - w0
    with av.open(str(dst)) as c:
        frames = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    return {"cpu_s": cpu, "wall_s": wall, "out_bytes": dst.stat().st_size, "frames": frames}


def bench_transcode(paths: list, cfg: TranscodeConfig, workdir: Path, repeat: int, which: set) -> dict:
    """(a) and (b), interleaved video by video so load from other processes hits both alike; for each
    video the fastest of `repeat` runs (by CPU time) counts, the usual way to read a noisy machine."""
    workdir.mkdir(parents=True, exist_ok=True)
    if "tubelet" in which:  # imports and the DALI pipeline are set up once per worker process: not measured
        tubelet_once(paths[0], cfg)
    runs = {k: [[] for _ in paths] for k in which}
    for _ in range(repeat):
        for i, p in enumerate(paths):
            if "tubelet" in which:
                runs["tubelet"][i].append(tubelet_once(p, cfg))
            if "ffmpeg" in which:
                runs["ffmpeg"][i].append(ffmpeg_once(p, cfg, workdir))
    out = {}
    for k, per_video in runs.items():
        best = [min(rs, key=lambda r: r["cpu_s"]) for rs in per_video]
        out[k] = {f: sum(b[f] for b in best) for f in best[0] if f != "size"}
        out[k]["cpu_s_median_run"] = sum(float(np.median([r["cpu_s"] for r in rs])) for rs in per_video)
        if k == "tubelet":
            out[k]["size"] = best[0]["size"]
    return out


probe_cache: dict = {}


# ----------------------------------------------------------------------------------------------------
# (c) make_shards end to end


def bench_make_shards(paths: list, cfg: TranscodeConfig, workers: int, workdir: Path) -> dict:
    from shards.build import run
    import contextlib
    import io

    out = workdir / f"shards-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    lst = workdir / "inputs.csv"
    lst.write_text("path\n" + "".join(f"{p.resolve()}\n" for p in paths))
    conf = load_config(ShardsConfig, None, [
        f"inputs.train={lst}", f"output={out}", f"workers={workers}", "progress=false",
        f"transcode.codec={cfg.codec}", f"transcode.crf={cfg.crf}", f"transcode.speed={cfg.speed}",
        f"transcode.short_side={cfg.short_side}", f"transcode.keyframe_interval={cfg.keyframe_interval}"])
    c0, w0 = _children_cpu(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(conf)
    wall = time.perf_counter() - w0
    assert summary["sharded"] == len(paths), summary
    return {"workers": workers, "wall_s": wall, "videos_per_s": len(paths) / wall,
            "worker_cpu_s": summary["worker_cpu_seconds"], "children_cpu_s": _children_cpu() - c0,
            "bytes": summary["bytes"]}


# ----------------------------------------------------------------------------------------------------


@dataclass
class BenchShardsConfig:
    videos: int = 8  # input videos (H.264 mp4, moving textured content), written once into `cache`
    seconds: float = 6.0  # length of each input
    size: str = "640x360"  # WxH of the inputs
    fps: int = 30
    codec: str = "vp9"  # the transcode's output codec: vp9 | h264
    workers: List[int] = field(default_factory=lambda: [1, os.cpu_count() or 1])  # worker counts for (c)
    cache: str = "data/bench"
    results: str = "data/bench/results.json"
    repeat: int = 3  # runs per video for (a) and (b); the fastest counts
    skip: List[str] = field(default_factory=list)  # parts to skip: tubelet, ffmpeg, scaling

    def validate(self) -> None:
        check(self.videos >= 1 and self.seconds > 0 and self.fps >= 1, "videos", "videos, seconds, fps must be > 0")
        check(len(self.size.lower().split("x")) == 2, "size", f"must be WxH, got {self.size!r}")
        check(self.codec in ("vp9", "h264"), "codec", "must be vp9 or h264")
        check(all(w >= 1 for w in self.workers), "workers", "worker counts must be >= 1")
        check(set(self.skip) <= {"tubelet", "ffmpeg", "scaling"}, "skip", "parts are tubelet, ffmpeg, scaling")


def bench(a: BenchShardsConfig) -> None:
    skip = set(a.skip)
    w, h = map(int, a.size.lower().split("x"))
    cache = Path(a.cache)
    paths = make_inputs(cache, a.videos, a.seconds, w, h, a.fps)
    for p in paths:
        probe_cache[p] = probe(p)
    src_seconds = sum(d for _, _, d in probe_cache.values())
    cfg = TranscodeConfig(codec=a.codec)
    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "pyav": av.__version__, "ffmpeg": _ffmpeg_version()},
           "inputs": {"videos": len(paths), "seconds_each": a.seconds, "size": a.size, "fps": a.fps, "codec": "h264",
                      "source_seconds": round(src_seconds, 3)},
           "transcode": {k: getattr(cfg, k) for k in ("codec", "short_side", "crf", "speed", "keyframe_interval")},
           "repeat": a.repeat}
    res.update(bench_transcode(paths, cfg, work / "ffmpeg", a.repeat, {"tubelet", "ffmpeg"} - skip))
    if "scaling" not in skip:
        res["scaling"] = [bench_make_shards(paths, cfg, n, work) for n in a.workers]
    shutil.rmtree(work, ignore_errors=True)
    _derive(res, src_seconds, len(paths))
    print(_table(res))
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(res, indent=2))
    print(f"\nresults: {a.results}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchShardsConfig, bench, argv, prog="python -m benchmarks.bench_shards", doc=__doc__)


def _ffmpeg_version() -> str:
    try:
        return subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "not installed"


def _derive(res: dict, src_seconds: float, n: int) -> None:
    for k in ("tubelet", "ffmpeg"):
        r = res.get(k)
        if r:
            r["src_s_per_cpu_s"] = src_seconds / r["cpu_s"]
            r["videos_per_s"] = n / r["wall_s"]
    t = res.get("tubelet")
    if t:
        t["transcode_cpu_s"] = t["cpu_s"] - t["validate_cpu_s"]
        t["transcode_src_s_per_cpu_s"] = src_seconds / t["transcode_cpu_s"]
    if t and res.get("ffmpeg"):
        f = res["ffmpeg"]
        res["ratio_tubelet_over_ffmpeg"] = {
            "speed_total": t["src_s_per_cpu_s"] / f["src_s_per_cpu_s"],  # > 1: tubelet faster
            "speed_transcode_only": t["transcode_src_s_per_cpu_s"] / f["src_s_per_cpu_s"],
            "output_bytes": t["out_bytes"] / f["out_bytes"],
        }
    sc = res.get("scaling")
    if sc:
        base = sc[0]["videos_per_s"]
        for r in sc:
            r["speedup"] = r["videos_per_s"] / base


def _table(res: dict) -> str:
    inp = res["inputs"]
    lines = [f"inputs: {inp['videos']} x {inp['seconds_each']:g} s {inp['size']} {inp['fps']} fps H.264 "
             f"({inp['source_seconds']:.1f} source-seconds); output {res['transcode']}; {res['machine']['cpus']} CPUs",
             "", "| what | CPU s | wall s | source-s per CPU-s | videos/s | output bytes |", "|---|---|---|---|---|---|"]
    t, f = res.get("tubelet"), res.get("ffmpeg")
    if t:
        lines.append(f"| tubelet `process` (transcode + validation), 1 process | {t['cpu_s']:.2f} | {t['wall_s']:.2f} | "
                     f"{t['src_s_per_cpu_s']:.2f} | {t['videos_per_s']:.2f} | {t['out_bytes']:,} |")
        lines.append(f"| &nbsp; of which `validate_video` (decode-back) | {t['validate_cpu_s']:.2f} | "
                     f"{t['validate_wall_s']:.2f} | | | |")
        lines.append(f"| &nbsp; tubelet transcode only | {t['transcode_cpu_s']:.2f} | | "
                     f"{t['transcode_src_s_per_cpu_s']:.2f} | | |")
    if f:
        lines.append(f"| ffmpeg CLI, same settings, 1 thread | {f['cpu_s']:.2f} | {f['wall_s']:.2f} | "
                     f"{f['src_s_per_cpu_s']:.2f} | {f['videos_per_s']:.2f} | {f['out_bytes']:,} |")
    r = res.get("ratio_tubelet_over_ffmpeg")
    if r:
        lines += ["", f"tubelet/ffmpeg speed (source-s per CPU-s): {r['speed_total']:.3f} with validation, "
                      f"{r['speed_transcode_only']:.3f} transcode only; output bytes ratio {r['output_bytes']:.3f}"]
    if res.get("scaling"):
        lines += ["", "| shards.build.run workers | wall s | videos/s | speedup | CPU s of workers (rusage) | "
                      "CPU s in `process` (summary) |", "|---|---|---|---|---|---|"]
        for s in res["scaling"]:
            lines.append(f"| {s['workers']} | {s['wall_s']:.2f} | {s['videos_per_s']:.2f} | {s['speedup']:.2f} | "
                         f"{s['children_cpu_s']:.2f} | {s['worker_cpu_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
