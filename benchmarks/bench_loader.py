"""`make bench-loader`: what the shard format and the loader cost per clip, today's format against one stored at
the clips' sampling rate, and the DALI loader against the PyAV reference, all in one run.

    python -m benchmarks.bench_loader [videos=8] [seconds=8] [size=480x270] [fps=30] [batches=8] [workers=N]
                                      [data.<loader key>=value ...] [--json FILE]

1. Inputs: `videos` H.264 files of `seconds` s at `size` and `fps` with moving textured content
   (`benchmarks.bench_shards.write_input`), written once into `cache`.
2. Two shard sets of them, made once with `make shards`' own code (VP9, short side 256, a keyframe every 16
   stored frames): "today" (every frame, sides even: the format before frame_step and align) and "stepped"
   (transcode.frame_step = data.frame_stride, sides multiples of 16). Per set: bytes per video-second and the
   transcode's CPU seconds per video-second (the format's costs), the start-time granularity (its gain's price).
3. Loaders on the method's clips (data: 16x224x224, stride 4, batch 8), clips/s after one warm-up batch, and
   decoded frames per clip: today's format + DALI; the stepped set + DALI, with random starts and with starts on
   keyframes (data.align_starts); the PyAV reference (DataLoader processes, seeking to the keyframe before each
   clip) on the stepped set. DALI's decoded frames are counted from the records and the keyframe interval (its
   decoder seeks to the keyframe at or before a clip's first frame); the reference counts what it decodes.
   DALI gets `workers` threads, the reference `workers` processes.
4. Images (`images` > 0): generated JPEGs of `image_size`, sharded with `kind=image`; the DALI loader (the crop
   window decoded alone, then resized) against the PIL reference, same records, 1-frame clips.
5. Prints a markdown table and the ratios the format and the loaders are judged by; `--json FILE` writes
   `{"rows": [{name, clips_per_s, decoded_frames_per_clip, ...}], ...}`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.bench_shards import make_inputs
from common.cli import main_for
from common.config import check, load_config
from common.device import resolve_device
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.reference import ReferenceLoader
from shards.build import run as make_shards
from shards.config import ShardsConfig
from shards.manifest import read_manifest


@dataclass
class BenchLoaderConfig:
    data: LoaderConfig = field(default_factory=LoaderConfig)  # the clips (data.root is set to each shard set)
    videos: int = 8  # generated inputs
    seconds: float = 8.0
    size: str = "480x270"
    fps: int = 30
    cache: str = "data/bench/loader"  # inputs and shard sets, made once
    batches: int = 8  # batches timed per row, after one warm-up batch
    workers: int = 0  # DALI threads and reference DataLoader processes; 0 = the cores this process may use
    reference: bool = True  # also time the PyAV reference loader
    images: int = 96  # generated JPEGs for the image rows (0 = no image rows)
    image_size: str = "500x375"  # ImageNet's typical size
    image_batch: int = 32  # images per batch (I-JEPA trains with 128 per GPU)
    json: str = ""  # also write the rows as JSON here (`--json FILE` works too)

    def validate(self) -> None:
        check(self.videos >= 1 and self.seconds > 0 and self.fps >= 1, "videos", "videos, seconds, fps must be > 0")
        check("x" in self.size and all(p.isdigit() for p in self.size.split("x")), "size", "must be WxH, e.g. 480x270")
        check(self.batches >= 1, "batches", "must be >= 1")
        check(self.workers >= 0, "workers", "must be >= 0")


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
    return {"clips_per_s": clips / (time.perf_counter() - t0), "decoded_frames_per_clip": frames / clips,
            "clips": clips}


def dali_row(name: str, cfg: LoaderConfig, n: int) -> Dict:
    loader = VideoLoader(cfg)
    try:
        op = "image_slice" if loader.images else "video"
        return {"name": name, "loader": f"DALI decoders.{op} {'mixed' if loader.device.type == 'cuda' else 'cpu'}, "
                                        f"{loader.threads} threads", **time_loader(loader, n, loader.decoded_frames)}
    finally:
        loader.close()


def reference_row(name: str, cfg: LoaderConfig, n: int, workers: int) -> Dict:
    ref = ReferenceLoader(cfg, workers=workers)
    seen = {"frames": 0}

    def decoded(b) -> int:  # the reference counts what its workers decoded, batch by batch
        frames, seen["frames"] = ref.decoded_frames - seen["frames"], ref.decoded_frames
        return frames

    what = "PIL" if ref.index.kind == "image" else "PyAV"
    return {"name": name, "loader": f"{what} + torch, DataLoader {workers} processes",
            **time_loader(ref.batches(n + 1), n, decoded)}


def bench(args: BenchLoaderConfig) -> List[Dict]:
    workers = args.workers or len(os.sched_getaffinity(0))
    w, h = (int(p) for p in args.size.split("x"))
    paths = make_inputs(Path(args.cache), args.videos, args.seconds, w, h, args.fps)
    inputs = paths[0].parent
    step = args.data.frame_stride
    print(f"shard sets of {args.videos} x {args.seconds:g} s {args.size} {args.fps} fps in {args.cache}",
          file=sys.stderr)
    sets = {"today": shard_set(args, "today", inputs, "transcode.align=2"),
            "stepped": shard_set(args, f"step{step}", inputs, f"transcode.frame_step={step}", "transcode.align=16")}
    base = replace(args.data, threads=workers)
    today, stepped = replace(base, root=sets["today"]["root"]), replace(base, root=sets["stepped"]["root"])
    rows = [dali_row("today's format, DALI", today, args.batches),
            dali_row(f"stored every {step}th frame, DALI", stepped, args.batches),
            dali_row(f"stored every {step}th frame, DALI, starts on keyframes", replace(stepped, align_starts=True),
                     args.batches)]
    if args.reference:
        rows.append(reference_row(f"stored every {step}th frame, PyAV reference", stepped, args.batches, workers))
    for r, s in zip(rows, ["today", "stepped", "stepped", "stepped"]):
        r["set"] = s
    if args.images:
        sets["images"] = image_set(args.cache, args.images, args.image_size)
        images = replace(base, root=sets["images"]["root"], num_frames=1, frame_stride=1, batch_size=args.image_batch)
        rows.append(dict(dali_row("images (JPEG), DALI", images, args.batches), set="images"))
        if args.reference:
            rows.append(dict(reference_row("images (JPEG), PIL reference", images, args.batches, workers),
                             set="images"))

    c = args.data
    device = resolve_device(c.device).type
    print(f"\nloaders on {c.num_frames}x{c.crop_size}x{c.crop_size} clips, stride {c.frame_stride}, batch "
          f"{c.batch_size}, {c.dtype}; {platform.node()}, {len(os.sched_getaffinity(0))} cores, device {device}, "
          f"torch {torch.__version__}\n")
    print("| set | stored size | bytes per video-second | transcode CPU s per video-second | start step | keyframes |")
    print("|---|---|---|---|---|---|")
    for name, s in ((k, sets[k]) for k in ("today", "stepped")):
        print(f"| {name} (frame_step {s['frame_step']}) | {s['size']} | {s['bytes_per_video_second'] / 1e3:.0f} kB | "
              f"{s['transcode_cpu_per_video_second']:.2f} | {1000 * s['start_step_seconds']:.0f} ms | every "
              f"{1000 * s['keyframe_seconds']:.0f} ms |")
    print("\n| loader | path | clips/s | decoded frames per clip |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['loader']} | {r['clips_per_s']:.1f} | {r['decoded_frames_per_clip']:.1f} |")
    print(f"\nstepped / today (DALI): {rows[1]['clips_per_s'] / rows[0]['clips_per_s']:.2f}x")
    if args.reference:
        print(f"DALI / reference (stepped set): {rows[1]['clips_per_s'] / rows[3]['clips_per_s']:.2f}x")
    if args.images and args.reference:
        img = {r["name"]: r for r in rows if r["set"] == "images"}
        dali_img, ref_img = img["images (JPEG), DALI"], img["images (JPEG), PIL reference"]
        print(f"DALI / reference (images, {sets['images']['size']}, {sets['images']['bytes_per_image'] / 1e3:.0f} kB "
              f"each, 1x{c.crop_size}x{c.crop_size}, batch {args.image_batch}): "
              f"{dali_img['clips_per_s'] / ref_img['clips_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clip": [c.num_frames, c.crop_size, c.crop_size], "stride": c.frame_stride,
                       "batch": c.batch_size, "workers": workers, "device": device, "sets": sets, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchLoaderConfig, bench, argv, prog="python -m benchmarks.bench_loader",
                    doc=__doc__, flags={"--json": "json"})


if __name__ == "__main__":
    raise SystemExit(main())
