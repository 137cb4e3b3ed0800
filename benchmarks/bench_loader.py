"""`make bench-loader`: clips/s of the DALI loader and of the PyAV reference loader, same shards, same workers.

    python -m benchmarks.bench_loader [--root data/shards/sample] [--batches 12] [--workers N] [--out FILE]
                                      [key=value loader overrides ...]

Both loaders produce the same batches (same sampling records, masks included). The DALI loader gets
`workers` decode threads; the reference gets `workers` DataLoader processes. On a GPU host the DALI loader
decodes with NVDEC (device='mixed') and the table says so. Numbers are clips/s after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from common.config import load_config
from pipeline.config import LoaderConfig
from common.device import resolve_device
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/shards/sample")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-reference", action="store_true", help="GPU hosts: time only the DALI loader")
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(LoaderConfig, None, [f"root={args.root}", f"threads={args.workers}", *args.overrides])
    grid = (cfg.num_frames // 2, cfg.crop_size // 16, cfg.crop_size // 16)
    device = resolve_device(cfg.device).type

    dali_rate, n = timed(VideoLoader(cfg, grid=grid), args.batches)
    rows = [("DALI loader", f"decoders.video {'mixed (NVDEC)' if device == 'cuda' else 'cpu'}, {args.workers} threads",
             dali_rate)]
    ref_rate = None
    if not args.skip_reference:
        ref = ReferenceLoader(cfg, grid=grid, workers=args.workers).batches(args.batches + 1)
        ref_rate, _ = timed(ref, args.batches)
        rows.append(("reference loader", f"PyAV + torch, DataLoader {args.workers} workers", ref_rate))

    clip = f"{cfg.num_frames}x{cfg.crop_size}x{cfg.crop_size}, stride {cfg.frame_stride}, batch {cfg.batch_size}"
    print(f"\nloader throughput on {args.root} ({clip}, {n} clips timed), "
          f"{platform.node()} {os.cpu_count()} cores, device {device}\n")
    print("| loader | path | clips/s |\n|---|---|---|")
    for name, path, rate in rows:
        print(f"| {name} | {path} | {rate:.1f} |")
    if ref_rate:
        print(f"\nDALI / reference: {dali_rate / ref_rate:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"root": args.root, "clip": clip, "workers": args.workers, "device": device,
                       "dali_clips_per_s": dali_rate, "reference_clips_per_s": ref_rate}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
