"""The built-in sample dataset: short, labelled, synthetic motion videos (`make sample`, `make shards` with no
inputs).

``generate(out_dir)`` writes a small deterministic dataset that has exactly the shape of what a user brings:
ordinary video files in assorted containers, codecs, frame rates, resolutions and durations, plus one
``path,label`` CSV per split::

    OUT/videos/<split>/<class>/<class>_<index>.<ext>
    OUT/train.csv, OUT/val.csv      header ``path,label``; path relative to OUT
    OUT/classes.txt                 one class per line, in label order
    OUT/SAMPLE.json                 written last (atomically): completion marker

The clips are `shards.synthetic.render`'s scenes (the class is how the object moves; a single frame carries no
label). Container, codec and resolution follow one fixed cycle that every class walks through, so they carry
none either.

Everything is deterministic: each video's random generator is seeded from ``(seed, split, class, index)`` only
(train and val never share a seed), frames are rendered with numpy straight into the encoder's 4:2:0 planes (no
swscale), encoders run single-threaded with the bitexact flags set, and muxers run with ``+bitexact`` (so
Matroska/WebM do not write random UIDs and no muxer writes creation times or library versions). Byte identity
holds for the same FFmpeg/encoder builds (PyAV wheel); ``SAMPLE.json`` records them.

CLI::

    python -m shards.synthetic.generate [out=data/sample] [seed=0] [train_per_class=40] [val_per_class=12]
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence

import av
import numpy as np

from common import logs
from common.cli import main_for
from common.config import check
from common.files import atomic_path, atomic_write, sha256_file
from shards.synthetic.render import CLASSES, DEFAULT_STYLE, Scene, SceneStyle

__all__ = ["SPLITS", "FORMATS", "RESOLUTIONS", "FPS_CHOICES", "SampleConfig", "generate", "plan_videos",
           "scene_for", "main"]

log = logging.getLogger(__name__)

#: Bump whenever the bytes written for the same parameters change.
GENERATOR_VERSION = 1

SPLITS: tuple[str, ...] = ("train", "val")

#: (extension, muxer, encoder, pixel format, encoder options).  Cycled so every
#: class gets every format.
_H264 = {"preset": "superfast", "crf": "23"}
_VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0", "row-mt": "0", "lag-in-frames": "0"}
FORMATS: tuple[tuple[str, str, str, str, dict[str, str]], ...] = (
    ("mp4", "mp4", "libx264", "yuv420p", _H264),
    ("webm", "webm", "libvpx-vp9", "yuv420p", _VP9),
    ("mkv", "matroska", "libx264", "yuv420p", _H264),
    ("avi", "avi", "mpeg4", "yuv420p", {"qmin": "5", "qmax": "5"}),  # fixed quantiser
    ("mkv", "matroska", "libvpx-vp9", "yuv420p", _VP9),
    ("mov", "mov", "mjpeg", "yuvj420p", {"qmin": "8", "qmax": "8"}),
)

_CODEC_NAMES = {"libx264": "h264", "libvpx-vp9": "vp9", "mpeg4": "mpeg4", "mjpeg": "mjpeg"}

#: (width, height): small, even, one portrait.
RESOLUTIONS: tuple[tuple[int, int], ...] = ((320, 240), (240, 320), (352, 288), (256, 256), (400, 224))

FPS_CHOICES: tuple[int, ...] = (12, 15, 24, 25, 30)
DURATION_RANGE_S: tuple[float, float] = (1.5, 4.0)

# Length of the (format, resolution) cycle: every combination once per period.
CONFIG_PERIOD = math.lcm(len(FORMATS), len(RESOLUTIONS))


def _encode(path: str, scene: Scene, fmt_index: int, fps: int) -> None:
    ext, muxer, codec, pix_fmt, options = FORMATS[fmt_index]
    width, height = scene.width, scene.height
    container = av.open(
        str(path),
        "w",
        format=muxer,
        container_options={"fflags": "+bitexact", "flags": "+bitexact"},
    )
    try:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = Fraction(1, fps)
        cc = stream.codec_context
        cc.time_base = Fraction(1, fps)
        cc.thread_count = 1
        cc.gop_size = max(1, fps)  # a keyframe every second: cheap random access
        # Tag what the frames are: BT.601 (SMPTE 170M), limited range or full range (JPEG).
        full_range = pix_fmt == "yuvj420p"
        cc.color_range = 2 if full_range else 1
        cc.colorspace = cc.color_primaries = cc.color_trc = 6
        cc.options = {"flags": "+bitexact", "threads": "1", **options}
        # Frames are rendered straight into the encoder's 4:2:0 layout (BT.601; full range for
        # yuvj420p): no swscale conversion, so the bytes do not depend on its SIMD paths.
        for i, planes in enumerate(scene.frames_yuv420(full_range=full_range)):
            frame = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
            frame.color_range = cc.color_range
            frame.colorspace = frame.color_primaries = frame.color_trc = 6
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        container.close()


# --------------------------------------------------------------------------- dataset plan


def _video_rng(seed: int, split: str, cls_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), cls_index, index]))


def _clip_timing(rng: np.random.Generator) -> tuple[int, int]:
    """(fps, num_frames): the first draws of every video's generator."""
    fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
    duration = rng.uniform(*DURATION_RANGE_S)
    return fps, max(2, int(round(duration * fps)))


def plan_videos(seed: int, counts: dict[str, int]) -> list[dict[str, Any]]:
    """One task per video (split, class, index, file name, format, size, fps, frame count); `counts` is videos
    per class for each split. The (format, resolution) cycle is the same list for every class, shifted per class
    and split so small datasets still cover it."""
    tasks = []
    for split_id, split in enumerate(SPLITS):
        for c, cls in enumerate(CLASSES):
            for i in range(counts[split]):
                j = (i + 7 * c + 8 * split_id) % CONFIG_PERIOD
                fmt_index = j % len(FORMATS)
                width, height = RESOLUTIONS[j % len(RESOLUTIONS)]
                fps, num_frames = _clip_timing(_video_rng(seed, split, c, i))
                ext = FORMATS[fmt_index][0]
                tasks.append(
                    dict(
                        seed=int(seed), split=split, cls=cls, cls_index=c, index=i,
                        rel=f"videos/{split}/{cls}/{cls}_{i:04d}.{ext}",
                        fmt_index=fmt_index, width=width, height=height, fps=fps, num_frames=num_frames,
                    )
                )
    return tasks


def scene_for(task: dict[str, Any], style: SceneStyle = DEFAULT_STYLE) -> Scene:
    """The scene of one planned video (its frames are what the video file holds, before the codec)."""
    rng = _video_rng(task["seed"], task["split"], task["cls_index"], task["index"])
    _clip_timing(rng)  # replay the plan's draws so the scene gets the same stream
    return Scene(rng, task["cls"], task["width"], task["height"], task["num_frames"], task["fps"], style)


def _make_video(task: dict[str, Any], out_dir: str) -> tuple[str, str, int]:
    final = Path(out_dir) / task["rel"]
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        _encode(tmp, scene_for(task), task["fmt_index"], task["fps"])
    return task["rel"], sha256_file(final), final.stat().st_size


def _make_video_star(args: tuple[dict[str, Any], str]) -> tuple[str, str, int]:
    return _make_video(*args)


def _params(seed: int, train_per_class: int, val_per_class: int) -> dict[str, Any]:
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "classes": list(CLASSES),
    }


def _is_complete(out: Path, params: dict[str, Any]) -> bool:
    marker = out / "SAMPLE.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator") != "tubelet.sample" or meta.get("params") != params:
        return False
    try:
        return all((out / rel).stat().st_size == entry["bytes"] for rel, entry in meta["files"].items())
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_per_class: int = 40,
    val_per_class: int = 12,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the sample dataset to ``out_dir`` (see module docstring) and return it.

    A no-op when ``out_dir/SAMPLE.json`` exists with the same parameters and
    all listed files are present with the recorded sizes.
    """
    out = Path(out_dir)
    if train_per_class < 0 or val_per_class < 0 or seed < 0:
        raise ValueError("seed and per-class counts must be >= 0")
    params = _params(seed, train_per_class, val_per_class)
    if _is_complete(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "SAMPLE.json"
    if marker.exists():
        marker.unlink()  # the folder is incomplete until the new marker lands

    t0 = time.perf_counter()
    tasks = plan_videos(seed, {"train": train_per_class, "val": val_per_class})
    # Longest first: better load balance for the pool.
    order = sorted(tasks, key=lambda t: -t["num_frames"] * t["width"] * t["height"])
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    n_workers = max(1, min(n_workers, len(tasks)))
    args = [(t, str(out)) for t in order]
    results: dict[str, tuple[str, int]] = {}

    bar = logs.Progress(len(tasks), f"sample -> {out}", "video", enabled=progress, logger=log)
    try:
        if n_workers == 1:
            it = map(_make_video_star, args)
            pool = None
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = ctx.Pool(n_workers)
            it = pool.imap_unordered(_make_video_star, args, chunksize=1)
        try:
            for rel, digest, size in it:
                results[rel] = (digest, size)
                bar.update(1)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        bar.close()

    # Remove stale videos (from an earlier, different generation) under videos/.
    expected = {t["rel"] for t in tasks}
    vids = out / "videos"
    if vids.is_dir():
        for p in sorted(vids.rglob("*")):
            if p.is_file() and p.relative_to(out).as_posix() not in expected:
                p.unlink()
        for p in sorted(vids.rglob("*"), reverse=True):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label"])
        for t in tasks:
            if t["split"] == split:
                w.writerow([t["rel"], t["cls"]])
        data = buf.getvalue().encode()
        atomic_write(out / f"{split}.csv", data)
        files[f"{split}.csv"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    data = ("\n".join(CLASSES) + "\n").encode()
    atomic_write(out / "classes.txt", data)
    files["classes.txt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for t in sorted(tasks, key=lambda t: t["rel"]):
        ext, _, encoder, pix_fmt, _ = FORMATS[t["fmt_index"]]
        digest, size = results[t["rel"]]
        files[t["rel"]] = {
            "sha256": digest,
            "bytes": size,
            "split": t["split"],
            "label": t["cls"],
            "container": ext,
            "codec": _CODEC_NAMES[encoder],
            "encoder": encoder,
            "pix_fmt": pix_fmt,
            "width": t["width"],
            "height": t["height"],
            "fps": t["fps"],
            "frames": t["num_frames"],
        }

    meta = {
        "generator": "tubelet.sample",
        "params": params,
        # informational: byte-identity holds for the same encoder libraries
        "libraries": {k: ".".join(map(str, v)) for k, v in sorted(av.library_versions.items())},
        "counts": {s: sum(1 for t in tasks if t["split"] == s) for s in SPLITS},
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }
    atomic_write(marker, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    if progress:
        log.info(f"sample: {len(tasks)} videos, {meta['total_bytes'] / 1e6:.1f} MB in "
                 f"{time.perf_counter() - t0:.1f}s with {n_workers} worker(s) -> {out}")
    return out


# --------------------------------------------------------------------------- CLI


@dataclass
class SampleConfig:
    out: str = "data/sample"  # output folder
    seed: int = 0
    train_per_class: int = 40  # videos per class in the train split
    val_per_class: int = 12  # videos per class in the val split
    workers: int = 0  # processes; 0 = all cores
    progress: bool = True  # progress (a bar on a terminal, a line every 10 s otherwise) and a summary line

    def validate(self) -> None:
        check(bool(self.out), "out", "must name a folder")
        for key in ("seed", "train_per_class", "val_per_class", "workers"):
            check(getattr(self, key) >= 0, key, "must be >= 0")


def main(argv: Optional[Sequence[str]] = None) -> int:
    def run(cfg: SampleConfig) -> None:
        print(generate(cfg.out, seed=cfg.seed, train_per_class=cfg.train_per_class,
                       val_per_class=cfg.val_per_class, workers=cfg.workers or None, progress=cfg.progress))

    return main_for(SampleConfig, run, argv, prog="tubelet-sample", doc=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
