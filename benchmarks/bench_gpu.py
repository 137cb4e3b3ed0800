"""`make bench-gpu`: the decode paths on one GPU, then the best of them feeding a real ViT-L/16 V-JEPA step.

    python -m benchmarks.bench_gpu [out=runs/bench-gpu] [videos=24] [seconds=6] [batches=8] [smoke=false]

Runs in about 4 minutes on one H100/H200 (`make gpu-check` gives it 240 s) and needs nothing beyond torch and the
DALI bundle (PyNvVideoCodec for its row): it makes its own inputs (`benchmarks.bench_shards.write_input`, 480x270
at 30 fps) and shard sets with `make shards`' code, stored every 4th frame with sides in whole macroblocks, VP9
and H.264 (a few MB). The versions come first (versions.json and the first line of OUT/rows.jsonl), then each row,
appended to OUT/rows.jsonl the moment it is measured (a timeout still leaves what was done); a row that fails
says why in its place and the others go on:

    decoders.video mixed, H.264 / VP9      the loader as it trains (`pipeline.loader.VideoLoader`, NVDEC)
    decoders.video cpu, VP9                the same loader decoding on the CPU (all cores)
    readers.video gpu (legacy), H.264      P pipelines, each with one NVDEC session that it keeps, reading files
                                           listed from the project's sampling records (start frames), with the
                                           records' crops and flips applied after it
    PyNvVideoCodec, H.264                  the peer: NVIDIA's own NVDEC library, one SimpleDecoder per thread reused
                                           for every clip (reconfigure_decoder), the same sampling records, the
                                           clip cut with torch on the GPU (`pipeline.clips.cut_clip`)
    torchcodec cuda, raw H.264 files       `make bench-loader`'s torchcodec peer on the raw inputs the sets were
                                           made from, with its CUDA decoder and the official transform on the GPU,
                                           in this process (`benchmarks.peers`; smoke: its CPU decoder)

    decoders.image_slice mixed, JPEG      the image loader (nvJPEG, the crop window decoded alone), 256
                                           generated 500x375 JPEGs, 1x224x224, batch 128

with clips/s (16x224x224, stride 4, batch 24), ms per clip, decoded frames/s (counted from the records and the
keyframe interval), NVDEC and SM utilisation (NVML, sampled every 0.2 s), and this process's CPU use. Then the
image loader feeds an I-JEPA ViT-H/14 step (batch 128, bf16), and the best GPU video row's loader feeds
`train.step.train_step` (ViT-L/16, batch 24, bf16), each in one loop: clips/s against the step alone on a
resident batch, and the share of time the step waited for data.

smoke=true: the same script on the CPU with tiny inputs, a tiny model and only the CPU decode rows (what
`make test` runs); the GPU-only rows say why they were not measured.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.bench_loader import image_set
from benchmarks.bench_shards import make_inputs
from benchmarks.peers import PeerLoader, availability, min_decoded_frames, probe_raw
from common.cli import main_for
from common.config import check, load_config
from pipeline.clips import IMAGENET_MEAN, IMAGENET_STD, cut_clip
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.sampling import decoded_frames, frame_indices
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
    videos: int = 24
    seconds: float = 6.0
    batches: int = 8  # batches timed per row, after one warm-up batch
    pipelines: int = 4  # legacy readers.video pipelines on the GPU
    decoder_threads: int = 8  # PyNvVideoCodec: threads, each with its own decoder and CUDA stream
    train_steps: int = 12  # joint loop and step-alone steps (after 3 warm-up steps)
    size: str = "large"  # the model of the joint loop
    smoke: bool = False  # CPU, tiny inputs and model, CPU decode only

    def validate(self) -> None:
        check(self.videos >= 1 and self.seconds > 0, "videos", "videos and seconds must be > 0")
        check(self.batches >= 1 and self.pipelines >= 1 and self.train_steps >= 1, "batches",
              "batches, pipelines and train_steps must be >= 1")


class Usage:
    """NVDEC and SM utilisation (NVML, every 0.2 s) and this process's CPU use, over a `with` block. An NVML failure
    (at start or while sampling) leaves the columns n/a and says why in `nvml_error`, never the row."""

    def __init__(self, device: torch.device):
        self.nvml, self.error = None, None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as e:  # no NVML: the columns say n/a
                self.nvml, self.error = None, error_text(e)
        self.dec: List[float] = []
        self.sm: List[float] = []

    def _poll(self) -> None:
        try:
            while not self._stop.wait(0.2):
                self.dec.append(self.nvml.nvmlDeviceGetDecoderUtilization(self.handle)[0])
                self.sm.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except Exception as e:  # the sampler stops; the row says why its columns are short
            self.error = error_text(e)

    def __enter__(self) -> "Usage":
        self._cpu0, self._t0 = _cpu_seconds(), time.perf_counter()
        self._stop = threading.Event()
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True, name="bench-nvml")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = (_cpu_seconds() - self._cpu0) / (time.perf_counter() - self._t0) / os.cpu_count()
        self._stop.set()
        if self.nvml is not None:
            self._thread.join()

    def columns(self) -> Dict:
        mean = lambda v: statistics.mean(v) if v else None  # noqa: E731
        cols = {"nvdec_pct": mean(self.dec), "sm_pct": mean(self.sm), "cpu_pct": 100 * self.cpu}
        return {**cols, "nvml_error": self.error} if self.error else cols


def error_text(e: BaseException) -> str:
    """`Type: last line of the message` (an exception with an empty message gives its type alone)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1][:300]}" if lines else type(e).__name__


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(name: str, device: torch.device, batches, n: int, decoded: Callable) -> Dict:
    """clips/s over `n` batches (each with `.clips`, first dimension the batch) after one warm-up batch, with the
    decode and utilisation columns."""
    it = iter(batches)
    next(it)
    clips = frames = 0
    with Usage(device) as use:
        t0 = time.perf_counter()
        for _ in range(n):
            b = next(it)
            clips += len(b.clips)
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
    write_files(idx, cfg.root, files)
    plan = plan_for(idx, cfg)
    stride = idx.stride_for(cfg.frame_stride)
    span = (cfg.num_frames - 1) * stride + 1
    per_pipe = [[] for _ in range(pipelines)]  # (file, start, end, record)
    for b in range((n + 2) * pipelines):
        bp = next(plan)
        for row, rec in zip(bp.rows, bp.records):
            start = min(rec.start, max(0, idx.nframes(row) - span))  # the reader has no edge padding
            per_pipe[b % pipelines].append((files / f"{idx.key(row)}.{idx.ext(row)}", start, start + span, rec))
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
            yield SimpleNamespace(clips=out)  # a TensorListGPU: len() is its batch

    return measure(name, torch.device("cuda"), batches(), n, lambda b: len(b.clips) * span)


def write_files(idx, root: str, folder: Path) -> None:
    """Each sample's video as a file of its own (the readers that take paths), once."""
    store = ShardStore(root)
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(len(idx)):
        path = folder / f"{idx.key(r)}.{idx.ext(r)}"
        if not path.exists():
            path.write_bytes(idx.read_video(store, r))


def pynvvideocodec_row(name: str, cfg: LoaderConfig, n: int, threads: int, files: Path) -> Dict:
    """NVIDIA's PyNvVideoCodec on the same sampling records: `threads` threads, each with one SimpleDecoder (RGB
    out, device memory) and one CUDA stream of its own, reused for every clip through reconfigure_decoder; the
    clip's frames by index (edge-padded like DALI's), cut with torch on the GPU (`cut_clip`: crop, bilinear
    antialiased resize, flip, normalise), a batch stacked after every thread's stream is done."""
    import PyNvVideoCodec as nvc

    dev = torch.device("cuda", 0)
    idx = open_split(cfg.root, cfg.split)
    write_files(idx, cfg.root, files)
    stride = idx.stride_for(cfg.frame_stride)
    plan = plan_for(idx, cfg)
    dims = (int(idx.column("width").max()), int(idx.column("height").max()))
    local = threading.local()

    def clip(row: int, rec) -> Tuple[torch.Tensor, torch.cuda.Event]:
        if not hasattr(local, "stream"):
            local.stream, local.decoder = torch.cuda.Stream(dev), None
        path = str(files / f"{idx.key(row)}.{idx.ext(row)}")
        with torch.cuda.stream(local.stream):
            if local.decoder is None:
                local.decoder = nvc.SimpleDecoder(path, gpu_id=dev.index, cuda_stream=local.stream.cuda_stream,
                                                  use_device_memory=True, max_width=dims[0], max_height=dims[1],
                                                  output_color_type=nvc.OutputColorType.RGB)
            else:
                local.decoder.reconfigure_decoder(path)
            wanted = frame_indices(rec.start, idx.nframes(row), cfg.num_frames, stride)
            distinct = sorted(set(wanted))
            got = local.decoder.get_batch_frames_by_index(distinct)
            frames = torch.stack([torch.from_dlpack(f) for f in got])  # [F, H, W, 3] uint8, a copy
            out = cut_clip(frames[[distinct.index(i) for i in wanted]], rec, cfg.crop_size)
            done = torch.cuda.Event()
            done.record(local.stream)
        return out, done

    pool = ThreadPoolExecutor(threads, thread_name_prefix="pynvc")

    def batches():
        while True:
            bp = next(plan)
            made = list(pool.map(clip, bp.rows, bp.records))
            for _, done in made:
                torch.cuda.current_stream(dev).wait_event(done)
            yield SimpleNamespace(clips=torch.stack([c for c, _ in made]).to(torch.bfloat16), bp=bp)

    def decoded(b) -> int:
        return sum(decoded_frames(r.start, idx.nframes(row), cfg.num_frames, stride, idx.keyframe_interval)
                   for row, r in zip(b.bp.rows, b.bp.records))

    try:
        return {**measure(name, dev, batches(), n, decoded), "version": nvc.__version__}
    finally:
        pool.shutdown()


def torchcodec_row(name: str, cfg: LoaderConfig, n: int, paths: List[Path], device: torch.device) -> Dict:
    """torchcodec as `make bench-loader`'s peer (`benchmarks.peers.PeerLoader`: a VideoDecoder per clip, the
    official transform, the project's sampling) on the raw files `paths`, decoding on `device`. Decoded frames:
    the least a seeking decoder decodes (torchcodec does not tell)."""
    videos = [probe_raw(str(p)) for p in paths]
    loader = PeerLoader("torchcodec", videos, cfg, device=device.type)

    def decoded(b) -> int:
        return sum(min_decoded_frames(videos[row], frame_indices(r.start, videos[row].nframes, cfg.num_frames,
                                                                 cfg.frame_stride))
                   for row, r in zip(b.rows, b.records))

    return {**measure(name, device, loader.batches(n + 1), n, decoded), "version": loader.version}


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
    """The machine and the versions the rows were measured with; a missing part says so (never an exception)."""
    v = {"host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for key, module in (("dali", "nvidia.dali"), ("pynvvideocodec", "PyNvVideoCodec")):
        try:
            v[key] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as e:
            v[key] = f"not available ({error_text(e)})"
    version, why = availability("torchcodec")
    v["torchcodec"] = version or why
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
    info = versions(device)
    rows_path.write_text(json.dumps({"versions": info}) + "\n")  # first, before anything can fail
    print(json.dumps(info), flush=True)
    (out / "versions.json").write_text(json.dumps(info, indent=2))
    rows: List[Dict] = []
    cache = Path(args.cache)

    def record(row: Dict) -> Dict:
        rows.append(row)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: " + (f"failed: {row['error']}" if "error" in row else
                                    f"{row['clips_per_s']:.1f} clips/s"), flush=True)
        return row

    def attempt(name: str, fn, *a) -> Dict:
        """One row: a failure (its inputs' included) costs this row only, and says why in its place."""
        try:
            row = fn(name, *a)
        except Exception as e:
            row = {"name": name, "error": error_text(e), "clips_per_s": 0.0}
        return record(row)

    def not_measured(name: str, why: str) -> Dict:
        return record({"name": name, "error": f"not measured: {why}", "clips_per_s": 0.0})

    videos, seconds, size = (2, 2.0, (160, 96)) if args.smoke else (args.videos, args.seconds, (480, 270))
    sets: Dict[str, str] = {}

    def shard_set(codec: str) -> str:
        """The inputs stored every 4th frame in `codec`, made once (here, inside the first row that needs it)."""
        if codec not in sets:
            inputs = make_inputs(cache, videos, seconds, *size, 30)[0].parent
            root = cache / f"{inputs.name}-{codec}-step4"
            if not (root / "manifest.parquet").exists():
                # H.264 is decode-checked with NVDEC: a few workers, not a CUDA context on every core
                workers = [f"workers={min(4, os.cpu_count() or 1)}"] if codec == "h264" else []
                make_shards(load_config(ShardsConfig, None, [
                    f"inputs.train={inputs}", f"output={root}", "progress=false", f"transcode.codec={codec}",
                    "transcode.frame_step=4", "transcode.keyframe_interval=16", "transcode.align=16", *workers]))
            sets[codec] = str(root)
        return sets[codec]

    data = ["frame_stride=4", *(SMOKE_DATA if args.smoke else ["batch_size=24", "dtype=bf16"])]
    base = load_config(LoaderConfig, None, data)

    def loader_on(codec: str, where: str):
        return lambda name, n: loader_row(name, replace(base, root=shard_set(codec), device=where), n)

    no_gpu = "needs a GPU" + (" (smoke run)" if args.smoke else "")
    for codec, label in (("h264", "H.264"), ("vp9", "VP9")):
        name = f"decoders.video mixed, {label}"
        attempt(name, loader_on(codec, "cuda"), args.batches) if gpu else not_measured(name, no_gpu)
    attempt("decoders.video cpu, VP9", loader_on("vp9", "cpu"), args.batches)
    legacy = f"readers.video gpu (legacy), H.264, {args.pipelines} pipelines"
    peer = f"PyNvVideoCodec, H.264, {args.decoder_threads} threads"
    if gpu:
        attempt(legacy, lambda name, *a: legacy_row(name, replace(base, root=shard_set("h264")), *a), args.batches,
                args.pipelines, cache / "files-h264")
        attempt(peer, lambda name, *a: pynvvideocodec_row(name, replace(base, root=shard_set("h264")), *a),
                args.batches, args.decoder_threads, cache / "files-h264")
    else:
        not_measured(legacy, no_gpu)
        not_measured(peer, no_gpu)
    def on_raw_files(name: str, n: int) -> Dict:  # the H.264 files the shard sets are made from
        return torchcodec_row(name, base, n, make_inputs(cache, videos, seconds, *size, 30), device)

    attempt(f"torchcodec {device.type}, raw H.264 files", on_raw_files, args.batches)
    candidates = [r for r in rows if "error" not in r and r["name"].startswith("decoders.video")
                  and (not gpu or "mixed" in r["name"])]
    if candidates:  # the trainer's loader path with the best decode option
        best = max(candidates, key=lambda r: r["clips_per_s"])
        codec = "h264" if "H.264" in best["name"] else "vp9"
        cfg = replace(base, root=shard_set(codec), device="cuda" if gpu else "cpu")
        model = SMOKE_MODEL if args.smoke else [f"model.size={args.size}", "amp=bf16", "device=cuda"]
        attempt(f"joint loop: {best['name']} -> ViT-{'tiny' if args.smoke else args.size}/16 step", joint_row,
                cfg, model, args.train_steps)

    # images: the JPEG path (nvJPEG ROI decode on the GPU) and I-JEPA's ViT-H/14 step; the set is made inside the row
    image_size = "160x120" if args.smoke else "500x375"
    images = replace(base, num_frames=1, frame_stride=1, batch_size=8 if args.smoke else 128,
                     crop_size=64 if args.smoke else 224, device="cuda" if gpu else "cpu")
    if args.smoke:
        images = replace(images, image_masks=replace(images.image_masks, min_keep=4))  # 8 x 8 patches

    def on_image_set(fn):
        return lambda name, *a: fn(name, replace(images, root=image_set(args.cache, 32 if args.smoke else 256,
                                                                        image_size)["root"]), *a)

    image_name = f"decoders.image_slice {'mixed' if gpu else 'cpu'}, JPEG {image_size}, batch {images.batch_size}"
    image_row = attempt(image_name, on_image_set(loader_row), args.batches)
    if "error" not in image_row:
        model = (SMOKE_IMAGE_MODEL if args.smoke else
                 ["model.size=huge", "model.patch_size=14", "amp=bf16", "device=cuda", *IMAGE_MODEL])
        attempt(f"joint loop: {image_name} -> I-JEPA ViT-{'tiny/8' if args.smoke else 'H/14'} step",
                on_image_set(joint_row), model, args.train_steps)
    table = render_table(rows, info)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    return rows


def render_table(rows: List[Dict], info: Dict) -> str:
    lines = [f"{info.get('gpu', 'CPU')}, driver {info.get('driver', '-')}, DALI {info['dali']}, torch {info['torch']}"
             f", CUDA {info['cuda']}, torchcodec {info.get('torchcodec', '-')}, {info['cores']} cores",
             "", "| path | clips/s | ms per clip | decoded frames/s | NVDEC % | SM % | CPU % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error'] if r['error'].startswith('not measured') else 'failed: ' + r['error']}"
                         " | | | | | |")
        elif "step_alone_clips_per_s" in r:
            lines.append(f"| {r['name']} | {r['clips_per_s']:.1f} (step alone {r['step_alone_clips_per_s']:.1f}, "
                         f"data wait {r['data_wait_share']:.1%}) | | | {fmt(r['nvdec_pct'], '.0f')} | "
                         f"{fmt(r['sm_pct'], '.0f')} | {r['cpu_pct']:.0f} |")
        else:
            lines.append(f"| {r['name']} | {r['clips_per_s']:.1f} | {r['ms_per_clip']:.1f} | "
                         f"{r['decoded_frames_per_s']:.0f} | {fmt(r['nvdec_pct'], '.0f')} | "
                         f"{fmt(r['sm_pct'], '.0f')} | {r['cpu_pct']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchGpuConfig, bench, argv, prog="python -m benchmarks.bench_gpu", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
