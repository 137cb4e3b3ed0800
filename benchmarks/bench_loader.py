"""`make bench-loader`: clips/s of the DALI loader and of the PyAV reference loader, same shards, same workers.

    python -m benchmarks.bench_loader [data.root=data/shards/sample] [batches=12] [workers=N] [out=FILE]
                                      [data.<loader key>=value ...]

Both loaders produce the same batches (same sampling records, masks included). The DALI loader gets
`workers` decode threads; the reference gets `workers` DataLoader processes. On a GPU host the DALI loader
decodes with NVDEC (device='mixed') and the table says so. Numbers are clips/s after one warm-up batch.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from common.cli import main_for
from common.config import check
from common.device import resolve_device
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.reference import ReferenceLoader


def timed(batches, n: int) -> tuple[float, int]:
    it = iter(batches)
    next(it)  # warm-up: pipeline build, worker start, first decode
    clips, t0 = 0, time.perf_counter()
    for _ in range(n):
        b = next(it)
        clips += b.clips.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clips / (time.perf_counter() - t0), clips


@dataclass
class BenchLoaderConfig:
    data: LoaderConfig = field(default_factory=LoaderConfig)  # the loader (data.root: the shard set to read)
    batches: int = 12  # batches timed, after one warm-up batch
    workers: int = 0  # DALI threads and reference DataLoader processes; 0 = the cores this process may use
    skip_reference: bool = False  # GPU hosts: time only the DALI loader
    out: str = ""  # also write the results as JSON here

    def validate(self) -> None:
        check(self.batches >= 1, "batches", "must be >= 1")
        check(self.workers >= 0, "workers", "must be >= 0")


def bench(args: BenchLoaderConfig) -> None:
    workers = args.workers or len(os.sched_getaffinity(0))
    cfg = replace(args.data, threads=workers)
    grid = (cfg.num_frames // 2, cfg.crop_size // 16, cfg.crop_size // 16)
    device = resolve_device(cfg.device).type
    dali_rate, n = timed(VideoLoader(cfg, grid=grid), args.batches)
    rows = [("DALI loader", f"decoders.video {'mixed (NVDEC)' if device == 'cuda' else 'cpu'}, {workers} threads",
             dali_rate)]
    ref_rate = None
    if not args.skip_reference:
        ref = ReferenceLoader(cfg, grid=grid, workers=workers).batches(args.batches + 1)
        ref_rate, _ = timed(ref, args.batches)
        rows.append(("reference loader", f"PyAV + torch, DataLoader {workers} workers", ref_rate))

    clip = f"{cfg.num_frames}x{cfg.crop_size}x{cfg.crop_size}, stride {cfg.frame_stride}, batch {cfg.batch_size}"
    print(f"\nloader throughput on {cfg.root} ({clip}, {n} clips timed), "
          f"{platform.node()} {os.cpu_count()} cores, device {device}\n")
    print("| loader | path | clips/s |\n|---|---|---|")
    for name, path, rate in rows:
        print(f"| {name} | {path} | {rate:.1f} |")
    if ref_rate:
        print(f"\nDALI / reference: {dali_rate / ref_rate:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"root": cfg.root, "clip": clip, "workers": workers, "device": device,
                       "dali_clips_per_s": dali_rate, "reference_clips_per_s": ref_rate}, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchLoaderConfig, bench, argv, prog="python -m benchmarks.bench_loader", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
