"""`make bench-gpu`: the decode paths on one GPU, then the best of them feeding a real ViT-L/16 V-JEPA step.

    python -m benchmarks.bench_gpu [out=runs/bench-gpu] [videos=32] [seconds=8] [batches=8] [smoke=false]

Runs in under 8 minutes on one H100/H200 and needs nothing beyond torch and the DALI bundle: it makes its own
inputs (`benchmarks.bench_shards.write_input`, 480x270 at 30 fps) and shard sets with `make shards`' code, stored
every 4th frame with sides in whole macroblocks, VP9 and H.264 (a few MB). Rows, each appended to
OUT/rows.jsonl the moment it is measured (a timeout still leaves what was done):

    decoders.video mixed, H.264 / VP9      the loader as it trains (`pipeline.loader.VideoLoader`, NVDEC)
    decoders.video cpu, VP9                the same loader decoding on the CPU (all cores)
    readers.video gpu (legacy), H.264      P pipelines, each with one NVDEC session that it keeps, reading files
                                           listed from the project's sampling records (start frames), with the
                                           records' crops and flips applied after it

    decoders.image_slice mixed, JPEG      the image loader (nvJPEG, the crop window decoded alone), 256
                                           generated 500x375 JPEGs, 1x224x224, batch 128

with clips/s (16x224x224, stride 4, batch 24), ms per clip, decoded frames/s (counted from the records and the
keyframe interval), NVDEC and SM utilisation (NVML, sampled every 0.2 s), and this process's CPU use. Then the
image loader feeds an I-JEPA ViT-H/14 step (batch 128, bf16), and the best GPU video row's loader feeds
`train.step.train_step` (ViT-L/16, batch 24, bf16), each in one loop: clips/s against the step alone on a
resident batch, and the share of time the step waited for data.

smoke=true: the same script on the CPU with tiny inputs, a tiny model and only the CPU decode row (what
`make test` runs).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.bench_loader import image_set
from benchmarks.bench_shards import make_inputs
from common.cli import main_for
from common.config import check, load_config
from pipeline.clips import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.split_index import open_split, plan_for
from pipeline.store import ShardStore
from shards.build import run as make_shards
from shards.config import ShardsConfig
from train import dist
from train.config import TrainConfig
from train.step import build, read_stats, train_step

# an image model: one frame, tubelet 1, one mask token, smooth L1 (I-JEPA through the one model code)
IMAGE_MODEL = ["model.num_frames=1", "model.tubelet_size=1", "model.num_mask_types=1", "model.loss=smooth_l1",
               "data.num_frames=1", "data.frame_stride=1"]
SMOKE_IMAGE_MODEL = ["model.size=tiny", "model.img_size=64", "model.patch_size=8", "model.predictor_width=96",
                     "model.predictor_depth=2", "model.predictor_heads=4", "data.crop_size=64",
                     "data.image_masks.min_keep=4", "device=cpu", "amp=off", *IMAGE_MODEL]
# the smoke run's clips and model: small enough for two CPU cores in seconds
SMOKE_DATA = ["num_frames=4", "crop_size=32", "batch_size=4", "dtype=fp32", "device=cpu"]
SMOKE_MODEL = ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.num_frames=4",
               "model.predictor_width=96", "model.predictor_depth=2", "model.predictor_heads=4", "data.crop_size=32",
               "data.num_frames=4", "device=cpu", "amp=off"]


@dataclass
class BenchGpuConfig:
    out: str = "runs/bench-gpu"  # rows.jsonl (as measured) and table.md
    cache: str = "data/bench/gpu"  # inputs and shard sets, made once
    videos: int = 32
    seconds: float = 8.0
    batches: int = 8  # batches timed per row, after one warm-up batch
    pipelines: int = 4  # legacy readers.video pipelines on the GPU
    train_steps: int = 12  # joint loop and step-alone steps (after 3 warm-up steps)
    size: str = "large"  # the model of the joint loop
    smoke: bool = False  # CPU, tiny inputs and model, CPU decode only

    def validate(self) -> None:
        check(self.videos >= 1 and self.seconds > 0, "videos", "videos and seconds must be > 0")
        check(self.batches >= 1 and self.pipelines >= 1 and self.train_steps >= 1, "batches",
              "batches, pipelines and train_steps must be >= 1")


class Usage:
    """NVDEC and SM utilisation (NVML, every 0.2 s) and this process's CPU use, over a `with` block."""

    def __init__(self, device: torch.device):
        self.nvml = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # no NVML: the columns say n/a
                self.nvml = None
        self.dec: List[float] = []
        self.sm: List[float] = []

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.dec.append(self.nvml.nvmlDeviceGetDecoderUtilization(self.handle)[0])
            self.sm.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self) -> "Usage":
        self._cpu0, self._t0 = _cpu_seconds(), time.perf_counter()
        self._stop = threading.Event()
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = (_cpu_seconds() - self._cpu0) / (time.perf_counter() - self._t0) / os.cpu_count()
        self._stop.set()
        if self.nvml is not None:
            self._thread.join()

    def columns(self) -> Dict:
        mean = lambda v: statistics.mean(v) if v else None  # noqa: E731
        return {"nvdec_pct": mean(self.dec), "sm_pct": mean(self.sm), "cpu_pct": 100 * self.cpu}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(name: str, device: torch.device, batches, n: int, decoded: Callable) -> Dict:
    """clips/s over `n` batches after one warm-up batch, with the decode and utilisation columns."""
    it = iter(batches)
    next(it)
    clips = frames = 0
    with Usage(device) as use:
        t0 = time.perf_counter()
        for _ in range(n):
            b = next(it)
            clips += b.clips.shape[0]
            frames += decoded(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return {"name": name, "clips_per_s": clips / seconds, "ms_per_clip": 1000 * seconds / clips,
            "decoded_frames_per_s": frames / seconds, **use.columns()}


def loader_row(name: str, cfg: LoaderConfig, n: int) -> Dict:
    loader = VideoLoader(cfg)
    try:
        return measure(name, loader.device, loader, n, loader.decoded_frames)
    finally:
        loader.close()


def legacy_row(name: str, cfg: LoaderConfig, n: int, pipelines: int, files: Path) -> Dict:
    """`fn.readers.video` (GPU only): P pipelines, each reading its own list of (file, start, end) entries drawn
    from the project's sampling plan, the records' crops and flips fed beside it in the same order."""
    from nvidia.dali import fn, pipeline_def, types

    idx = open_split(cfg.root, cfg.split)
    store = ShardStore(cfg.root)
    files.mkdir(parents=True, exist_ok=True)
    for r, key in enumerate(idx.keys):
        path = files / f"{key}.mp4"
        if not path.exists():
            path.write_bytes(idx.read_video(store, r))
    plan = plan_for(idx, cfg)
    stride = idx.stride_for(cfg.frame_stride)
    span = (cfg.num_frames - 1) * stride + 1
    per_pipe = [[] for _ in range(pipelines)]  # (file, start, end, record)
    for b in range((n + 2) * pipelines):
        bp = next(plan)
        for row, rec in zip(bp.rows, bp.records):
            start = min(rec.start, max(0, int(idx.nframes[row]) - span))  # the reader has no edge padding
            per_pipe[b % pipelines].append((files / f"{idx.keys[row]}.mp4", start, start + span, rec))
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    pipes = []
    for k, entries in enumerate(per_pipe):
        lst = files / f"list{k}.txt"
        lst.write_text("".join(f"{p} 0 {s} {e}\n" for p, s, e, _ in entries))
        recs = iter([r for *_, r in entries])

        def crops(recs=recs):
            rs = [next(recs) for _ in range(cfg.batch_size)]
            return ([np.array(r.crop[:2], np.float32) for r in rs],
                    [np.array((r.crop[0] + r.crop[2], r.crop[1] + r.crop[3]), np.float32) for r in rs],
                    [np.array(int(r.flip), np.int32) for r in rs])

        @pipeline_def(batch_size=cfg.batch_size, num_threads=2, device_id=0, prefetch_queue_depth=2)
        def graph():
            frames, _ = fn.readers.video(device="gpu", file_list=str(lst), file_list_frame_num=True,
                                         sequence_length=cfg.num_frames, stride=stride, step=10 ** 6,
                                         random_shuffle=False, name="reader")
            roi0, roi1, flip = fn.external_source(source=crops, num_outputs=3, batch=True,
                                                  dtype=[types.FLOAT, types.FLOAT, types.INT32])
            frames = fn.resize(frames, size=[cfg.crop_size, cfg.crop_size], roi_start=roi0, roi_end=roi1,
                               roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(frames, mirror=flip, mean=mean, std=std, output_layout="CFHW",
                                            dtype=types.FLOAT16)

        p = graph()
        p.build()
        pipes.append(p)

    def batches():
        k = 0
        while True:
            (out,) = pipes[k % pipelines].run()
            k += 1
            yield SimpleNamespace(clips=np.empty((len(out), 0)))

    return measure(name, torch.device("cuda"), batches(), n, lambda b: b.clips.shape[0] * span)


def joint_row(name: str, cfg: LoaderConfig, model: List[str], steps: int) -> Dict:
    """The loader feeding train_step in one loop, against the step alone on a resident batch."""
    tcfg = load_config(TrainConfig, None, [f"data.batch_size={cfg.batch_size}", "metrics.enabled=false",
                                           "optim.warmup_steps=1", *model])
    env = dist.init(tcfg.device)
    parts = build(tcfg, env)
    loader = VideoLoader(cfg, grid=tcfg.model.grid)
    it = iter(loader)
    resident = next(it)
    dev = env.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for i in range(3):
        train_step(parts, resident, i + 1)
    sync()
    t0 = time.perf_counter()
    read_stats([train_step(parts, resident, i + 4) for i in range(steps)])
    alone = steps * cfg.batch_size / (time.perf_counter() - t0)
    wait, results = 0.0, []
    with Usage(dev) as use:
        t0 = time.perf_counter()
        for i in range(steps):
            tw = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tw
            results.append(train_step(parts, batch, i + 4 + steps))
        read_stats(results)
        total = time.perf_counter() - t0
    loader.close()
    return {"name": name, "clips_per_s": steps * cfg.batch_size / total, "step_alone_clips_per_s": alone,
            "data_wait_share": wait / total, **use.columns()}


def versions(device: torch.device) -> Dict:
    import nvidia.dali as dali

    v = {"host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "dali": dali.__version__}
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            v["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            v["driver"] = "unknown (no NVML)"
    return v


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def bench(args: BenchGpuConfig) -> List[Dict]:
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows_path.write_text("")
    info = versions(device)
    print(json.dumps(info))
    (out / "versions.json").write_text(json.dumps(info, indent=2))

    videos, seconds, size = (2, 2.0, (160, 96)) if args.smoke else (args.videos, args.seconds, (480, 270))
    inputs = make_inputs(Path(args.cache), videos, seconds, *size, 30)[0].parent
    sets = {}
    for codec in ("vp9", "h264") if gpu else ("vp9",):
        root = Path(args.cache) / f"{inputs.name}-{codec}-step4"
        if not (root / "manifest.parquet").exists():
            make_shards(load_config(ShardsConfig, None, [
                f"inputs.train={inputs}", f"output={root}", "progress=false", f"transcode.codec={codec}",
                "transcode.frame_step=4", "transcode.keyframe_interval=16", "transcode.align=16"]))
        sets[codec] = str(root)

    data = ["frame_stride=4", *(SMOKE_DATA if args.smoke else ["batch_size=24", "dtype=bf16"])]
    base = load_config(LoaderConfig, None, data)
    rows: List[Dict] = []

    def record(row: Dict) -> None:
        rows.append(row)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: {row['clips_per_s']:.1f} clips/s", flush=True)

    def attempt(fn, *a) -> Optional[Dict]:
        try:
            row = fn(*a)
        except Exception as e:  # one path failing must not cost the others' numbers
            row = {"name": a[0], "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}",
                   "clips_per_s": 0.0}
        record(row)
        return row

    if gpu:
        for codec, label in (("h264", "H.264"), ("vp9", "VP9")):
            attempt(loader_row, f"decoders.video mixed, {label}", replace(base, root=sets[codec], device="cuda"),
                    args.batches)
    attempt(loader_row, "decoders.video cpu, VP9", replace(base, root=sets["vp9"], device="cpu"), args.batches)
    if gpu:
        attempt(legacy_row, f"readers.video gpu (legacy), H.264, {args.pipelines} pipelines",
                replace(base, root=sets["h264"]), args.batches, args.pipelines, Path(args.cache) / "files")
    candidates = [r for r in rows if "error" not in r and (not gpu or "mixed" in r["name"])]
    if candidates:  # the trainer's loader path with the best decode option
        best = max(candidates, key=lambda r: r["clips_per_s"])
        codec = "h264" if "H.264" in best["name"] else "vp9"
        cfg = replace(base, root=sets[codec], device="cuda" if gpu else "cpu")
        model = SMOKE_MODEL if args.smoke else [f"model.size={args.size}", "amp=bf16", "device=cuda"]
        attempt(joint_row, f"joint loop: {best['name']} -> ViT-{'tiny' if args.smoke else args.size}/16 step",
                cfg, model, args.train_steps)

    # images: the JPEG path (nvJPEG ROI decode on the GPU) and I-JEPA's ViT-H/14 step
    image_size = "160x120" if args.smoke else "500x375"
    images = replace(base, root=image_set(args.cache, 32 if args.smoke else 256, image_size)["root"],
                     num_frames=1, frame_stride=1,
                     batch_size=8 if args.smoke else 128, crop_size=64 if args.smoke else 224,
                     device="cuda" if gpu else "cpu")
    if args.smoke:
        images = replace(images, image_masks=replace(images.image_masks, min_keep=4))  # 8 x 8 patches
    image_row = attempt(loader_row, f"decoders.image_slice {'mixed' if gpu else 'cpu'}, JPEG {image_size}, batch "
                                    f"{images.batch_size}", images, args.batches)
    if "error" not in image_row:
        model = (SMOKE_IMAGE_MODEL if args.smoke else
                 ["model.size=huge", "model.patch_size=14", "amp=bf16", "device=cuda", *IMAGE_MODEL])
        attempt(joint_row, f"joint loop: {image_row['name']} -> I-JEPA ViT-{'tiny/8' if args.smoke else 'H/14'} step",
                images, model, args.train_steps)
    lines = [f"{info.get('gpu', 'CPU')}, driver {info.get('driver', '-')}, DALI {info['dali']}, torch {info['torch']}"
             f", CUDA {info['cuda']}, {info['cores']} cores",
             "", "| path | clips/s | ms per clip | decoded frames/s | NVDEC % | SM % | CPU % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
        elif "step_alone_clips_per_s" in r:
            lines.append(f"| {r['name']} | {r['clips_per_s']:.1f} (step alone {r['step_alone_clips_per_s']:.1f}, "
                         f"data wait {r['data_wait_share']:.1%}) | | | {fmt(r['nvdec_pct'], '.0f')} | "
                         f"{fmt(r['sm_pct'], '.0f')} | {r['cpu_pct']:.0f} |")
        else:
            lines.append(f"| {r['name']} | {r['clips_per_s']:.1f} | {r['ms_per_clip']:.1f} | "
                         f"{r['decoded_frames_per_s']:.0f} | {fmt(r['nvdec_pct'], '.0f')} | "
                         f"{fmt(r['sm_pct'], '.0f')} | {r['cpu_pct']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchGpuConfig, bench, argv, prog="python -m benchmarks.bench_gpu", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
