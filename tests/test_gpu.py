"""Checks that need a CUDA GPU (`make test-gpu`: `pytest -m gpu tests/test_gpu.py`; skipped without one).

They run on shard sets of their own (`gpu_shards`, `gpu_images`): NVDEC has minimum frame sizes that the CPU
suite's 64-128 px clips are below, so these clips are 256-320 px on the short side, VP9 and H.264. What they
check: NVDEC decoding equals the CPU reference on the same sampling records (VP9 and H.264); the output buffers are
reused safely (a batch's values never change after the next ones are taken); the image path on the GPU equals the
CPU path; the legacy reader row of `make bench-gpu` runs; the loader and the step never make the host wait (the
host-sync detector, which on a GPU also sees device-to-host and pageable copies); the loader on a second GPU (with
two or more).
"""

from __future__ import annotations

import csv
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.config import load_config
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.reference import ReferenceLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GRID = (4, 7, 7)  # 8 frames / tubelet 2, 112 px / patch 16
LEVEL = 1 / (0.226 * 255)  # one grey level in normalised units
SIZES = [(320, 256), (256, 320), (288, 256)]  # (w, h): above every NVDEC minimum, mixed orientations


def _shards(root, codec: str) -> str:
    from common.config import load_config as load
    from shards.build import run
    from shards.config import ShardsConfig
    from videos import write_video

    rows = []
    for i in range(6):
        w, h = SIZES[i % len(SIZES)]
        src = ("libx264", ".mp4") if i % 2 else ("libvpx-vp9", ".webm")
        rel = f"videos/v{i}{src[1]}"
        write_video(root / rel, src[0], w, h, 12, nframes=36 + 6 * i)
        rows.append((rel, ("a", "b", "c")[i % 3]))
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + rows)
    out = root / f"shards-{codec}"
    run(load(ShardsConfig, None, [f"inputs.train={root / 'train.csv'}", f"output={out}", "workers=2",
                                  "progress=false", "shard.max_samples=3", f"transcode.codec={codec}"]))
    return str(out)


@pytest.fixture(scope="module")
def gpu_shards(tmp_path_factory) -> dict:
    """{codec: root} for VP9 (the default) and H.264 sets of 6 videos, 256-320 px, 3-6 s at 12 fps."""
    root = tmp_path_factory.mktemp("gpu_shards")
    return {codec: _shards(root, codec) for codec in ("vp9", "h264")}


@pytest.fixture(scope="module")
def gpu_images(tmp_path_factory) -> str:
    from benchmarks.bench_loader import image_set

    return image_set(str(tmp_path_factory.mktemp("gpu_images")), 24, "320x256")["root"]


def cfg_for(root: str, *extra: str) -> LoaderConfig:
    return load_config(LoaderConfig, None, [f"root={root}", "batch_size=3", "num_frames=8", "frame_stride=3",
                                            "crop_size=112", "dtype=fp32", "threads=2", "device=cuda", *extra])


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_nvdec_decode_equals_the_cpu_reference(gpu_shards, codec):
    """device='mixed' decodes the same frames as PyAV on the CPU, for the same sampling records: mean difference
    under 2 grey levels (hardware and software decoders and the two resize filters round differently; a wrong
    frame, crop or flip is tens of levels)."""
    cfg = cfg_for(gpu_shards[codec])
    loader = VideoLoader(cfg, grid=GRID)
    it = iter(loader)
    gpu = [next(it) for _ in range(4)]
    loader.close()
    for d, r in zip(gpu, ReferenceLoader(cfg, grid=GRID).batches(4), strict=True):
        assert d.records == r.records and d.clips.device.type == "cuda"
        assert (d.clips.cpu() - r.clips).abs().mean() < 2 * LEVEL, d.keys


def test_a_batch_never_changes_after_the_next_ones_are_taken(gpu_shards):
    """DALI reuses its output memory and the copies run on a stream of their own: each batch, read only after
    five more were taken (and a kernel queued on the training stream between them), still equals what it was
    when it arrived and the CPU reference."""
    cfg = cfg_for(gpu_shards["vp9"], "prefetch=3", "dtype=bf16")
    loader = VideoLoader(cfg, grid=GRID)
    it = iter(loader)
    kept, snapshots = [], []
    for _ in range(6):
        b = next(it)
        snapshots.append(b.clips.float().cpu())  # waits for this batch only
        kept.append(b)
        torch.randn(4096, 4096, device="cuda").matmul(torch.randn(4096, 4096, device="cuda"))  # training work
    loader.close()
    for b, snap, r in zip(kept, snapshots, ReferenceLoader(cfg, grid=GRID).batches(6), strict=True):
        assert torch.equal(b.clips.float().cpu(), snap), b.keys
        assert (snap - r.clips).abs().mean() < 3 * LEVEL, b.keys  # bf16 rounding on top of the decoders'


def test_the_cuda_branch_of_the_loader(gpu_shards):
    """Clips leave in the training dtype on the GPU, masks and labels follow them there."""
    loader = VideoLoader(cfg_for(gpu_shards["vp9"], "dtype=bf16"), grid=GRID)
    b = next(iter(loader))
    loader.close()
    assert b.clips.dtype == torch.bfloat16 and b.clips.is_cuda and b.labels.is_cuda and b.padded.is_cuda
    assert all(c.is_cuda and t.is_cuda for c, t in b.masks)
    assert torch.isfinite(b.clips.float()).all()


def test_the_hand_off_never_makes_the_host_wait_on_a_gpu(gpu_shards):
    """On a GPU the detector also sees device-to-host copies and blocking (pageable) host-to-device ones."""
    from host_sync import NoHostSync

    loader = VideoLoader(cfg_for(gpu_shards["vp9"], "dtype=bf16"), grid=GRID)
    it = iter(loader)
    next(it)
    try:
        with NoHostSync():
            for _ in range(3):
                next(it)
    finally:
        loader.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_rank_on_the_second_gpu_decodes_and_copies_there(gpu_shards):
    loader = VideoLoader(cfg_for(gpu_shards["vp9"]), grid=GRID, local_rank=1, local_world_size=2)
    b = next(iter(loader))
    loader.close()
    assert b.clips.device == torch.device("cuda", 1) and b.labels.device == torch.device("cuda", 1)
    assert all(c.device == torch.device("cuda", 1) for c, _ in b.masks)


def test_image_slice_on_the_gpu_equals_the_cpu_path(gpu_images):
    """nvJPEG's ROI decode + the GPU resize against libjpeg-turbo + the CPU resize, same records: under 2 levels."""
    cfg = load_config(LoaderConfig, None, [f"root={gpu_images}", "batch_size=4", "num_frames=1", "frame_stride=1",
                                           "crop_size=112", "dtype=fp32", "threads=2", "device=cuda"])
    batches = {}
    for device in ("cuda", "cpu"):
        loader = VideoLoader(replace(cfg, device=device))
        it = iter(loader)
        batches[device] = [next(it) for _ in range(3)]
        loader.close()
    for g, c in zip(batches["cuda"], batches["cpu"], strict=True):
        assert g.records == c.records and g.clips.is_cuda and g.clips.shape == (4, 3, 1, 112, 112)
        assert (g.clips.cpu() - c.clips).abs().mean() < 2 * LEVEL, g.keys


def test_the_legacy_reader_row_of_bench_gpu(gpu_shards, tmp_path):
    """fn.readers.video (one NVDEC session per pipeline, reused) on the H.264 set's files, as `make bench-gpu`."""
    from benchmarks.bench_gpu import legacy_row

    cfg = cfg_for(gpu_shards["h264"], "dtype=fp16")
    row = legacy_row("legacy", cfg, 2, 2, tmp_path / "files")
    assert row["clips_per_s"] > 0 and row["decoded_frames_per_s"] > 0


def _tiny_step_inputs():
    from pipeline.masks import sample_masks
    from train import dist
    from train.config import TrainConfig
    from train.step import build

    cfg = load_config(TrainConfig, None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8",
                                          "model.num_frames=4", "data.crop_size=32", "data.num_frames=4",
                                          "data.batch_size=2", "device=cuda", "metrics.enabled=false"])
    parts = build(cfg, dist.init("cuda"))
    rng = np.random.default_rng(0)
    batches = [SimpleNamespace(clips=torch.randn(2, 3, 4, 32, 32, device="cuda"), masks=[
        (torch.from_numpy(c).cuda(), torch.from_numpy(t).cuda()) for c, t in sample_masks(rng, 2, cfg.model.grid,
                                                                                          cfg.data.masks)])
        for _ in range(3)]
    return parts, batches


def test_the_training_step_never_waits_for_the_gpu():
    """torch's sync debug mode raises on any synchronising call, and the host-sync detector on any host read or
    copy: none inside train_step (collapse signals off), the NaN guard included."""
    from host_sync import NoHostSync
    from train.step import read_stats, train_step

    parts, batches = _tiny_step_inputs()
    train_step(parts, batches[0], 1)  # the first step allocates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with NoHostSync():
            results = [train_step(parts, b, i + 2, force_nan=i == 1) for i, b in enumerate(batches[1:])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [bad for *_, bad in read_stats(results)] == [False, True]
