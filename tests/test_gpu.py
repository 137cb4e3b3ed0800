"""Checks that need a CUDA GPU (`pytest -m gpu`; skipped without one): NVDEC decoding against the CPU reference,
the CUDA branch of the loader, and a training step that never waits for the device."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.config import load_config
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.reference import ReferenceLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GRID = (4, 3, 3)
LEVEL = 1 / (0.226 * 255)  # one grey level in normalised units


def cfg_for(root: str, *extra: str) -> LoaderConfig:
    return load_config(LoaderConfig, None, [f"root={root}", "batch_size=3", "num_frames=8", "frame_stride=3",
                                            "crop_size=48", "dtype=fp32", "threads=2", "device=cuda", *extra])


def test_nvdec_decode_equals_the_cpu_reference(small_shards):
    """device='mixed' decodes the same frames as PyAV on the CPU, for the same sampling records: mean difference
    under 2 grey levels (hardware and software decoders and the two resize filters round differently; a wrong
    frame, crop or flip is tens of levels)."""
    cfg = cfg_for(small_shards)
    loader = VideoLoader(cfg, grid=GRID)
    it = iter(loader)
    gpu = [next(it) for _ in range(4)]
    loader.close()
    for d, r in zip(gpu, ReferenceLoader(cfg, grid=GRID).batches(4), strict=True):
        assert d.records == r.records and d.clips.device.type == "cuda"
        assert (d.clips.cpu() - r.clips).abs().mean() < 2 * LEVEL, d.keys


def test_the_cuda_branch_of_the_loader(small_shards):
    """Clips leave in the training dtype on the GPU, masks and labels follow them there."""
    loader = VideoLoader(cfg_for(small_shards, "dtype=bf16"), grid=GRID)
    b = next(iter(loader))
    loader.close()
    assert b.clips.dtype == torch.bfloat16 and b.clips.is_cuda and b.labels.is_cuda and b.padded.is_cuda
    assert all(c.is_cuda and t.is_cuda for c, t in b.masks)
    assert torch.isfinite(b.clips.float()).all()


def test_the_training_step_never_waits_for_the_gpu():
    """torch's sync debug mode raises on any synchronising call: none inside train_step (collapse signals off)."""
    from pipeline.masks import sample_masks
    from train import dist
    from train.config import TrainConfig
    from train.step import build, read_stats, train_step

    cfg = load_config(TrainConfig, None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8",
                                          "model.num_frames=4", "data.crop_size=32", "data.num_frames=4",
                                          "data.batch_size=2", "device=cuda", "metrics.enabled=false"])
    parts = build(cfg, dist.init("cuda"))
    rng = np.random.default_rng(0)
    batches = [SimpleNamespace(clips=torch.randn(2, 3, 4, 32, 32, device="cuda"), masks=[
        (torch.from_numpy(c).cuda(), torch.from_numpy(t).cuda()) for c, t in sample_masks(rng, 2, cfg.model.grid,
                                                                                          cfg.data.masks)])
        for _ in range(3)]
    train_step(parts, batches[0], 1)  # the first step allocates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [train_step(parts, b, i + 2, force_nan=i == 1) for i, b in enumerate(batches[1:])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [bad for *_, bad in read_stats(results)] == [False, True]
