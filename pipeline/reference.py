"""The reference loader: the same batches as `VideoLoader`, written plainly with a PyTorch DataLoader and PyAV.

It shares only the sampling (pipeline/sampling.py, masks included) and the definition of a clip
(pipeline/clips.py) with the loader it checks, and decodes with FFmpeg instead of DALI.
It is the oracle of the loader tests and the baseline of `make bench-loader`; it is not meant to be fast.
"""

from __future__ import annotations

import io
from typing import List, Optional, Tuple

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.clips import DTYPES, Batch, cut_clip
from pipeline.config import LoaderConfig
from pipeline.sampling import BatchPlan, ClipRecord, Plan, frame_indices
from pipeline.split_index import open_split
from pipeline.store import ShardStore


def decode_frames(video: bytes, indices: List[int]) -> np.ndarray:
    """Frames at `indices` (ascending, repeats allowed) as [F, H, W, 3] uint8; decodes from the start."""
    wanted = sorted(set(indices))
    got = {}
    with av.open(io.BytesIO(video)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    last = max(got)
    return np.stack([got.get(i, got[last]) for i in indices])


def make_clip(video: bytes, rec: ClipRecord, nframes: int, num_frames: int, stride: int, size: int) -> torch.Tensor:
    """One clip [3, T, size, size] float32 normalised, decoded with PyAV and cut by `clips.cut_clip`."""
    frames = decode_frames(video, frame_indices(rec.start, nframes, num_frames, stride))  # [T, H, W, 3]
    return cut_clip(torch.from_numpy(frames), rec, size)


class _Batches(Dataset):
    def __init__(self, cfg: LoaderConfig, plans: List[BatchPlan], grid, mask_plan: Plan):
        self.cfg, self.plans, self.grid = cfg, plans, grid
        self.masks = [mask_plan.masks(bp, grid, cfg.masks) for bp in plans]
        self.index = None

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int):
        cfg, bp = self.cfg, self.plans[i]
        if self.index is None:  # opened lazily, once per worker process
            self.index = open_split(cfg.root, cfg.split)
            self.store = ShardStore(cfg.root, cfg.cache_dir)
        clips = torch.stack([
            make_clip(self.index.read_video(self.store, r), rec, int(self.index.nframes[r]), cfg.num_frames,
                      cfg.frame_stride, cfg.crop_size)
            for r, rec in zip(bp.rows, bp.records)])
        return clips, i


class ReferenceLoader:
    """`num_batches` batches for one rank from the current state, through a DataLoader with `workers` processes."""

    def __init__(self, cfg: LoaderConfig, *, grid: Optional[Tuple[int, int, int]] = None, rank: int = 0,
                 world_size: int = 1, train: bool = True, workers: int = 0, state: Optional[dict] = None):
        self.cfg, self.grid, self.workers = cfg, grid, workers
        self.index = open_split(cfg.root, cfg.split, cfg.verify_hashes)
        self.plan = Plan(self.index.geometry(), batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                         seed=cfg.seed, train=train, num_frames=cfg.num_frames, stride=cfg.frame_stride,
                         scale=cfg.crop_scale, ratio=cfg.crop_aspect, flip=cfg.flip, num_clips=cfg.eval_clips,
                         num_crops=cfg.eval_crops)
        if state is not None:
            self.plan.load_state_dict(state)

    def batches(self, num_batches: Optional[int] = None):
        plans = []
        for bp in self.plan:
            plans.append(bp)
            if num_batches is not None and len(plans) == num_batches:
                break
        ds = _Batches(self.cfg, plans, self.grid, self.plan)
        dl = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.workers,
                        persistent_workers=False, prefetch_factor=2 if self.workers else None)
        dtype = DTYPES[self.cfg.dtype]
        for clips, i in dl:
            bp = plans[i]
            yield Batch(
                clips=clips.to(dtype),
                masks=[(torch.from_numpy(c), torch.from_numpy(t)) for c, t in ds.masks[i]],
                keys=[self.index.keys[r] for r in bp.rows],
                labels=torch.from_numpy(self.index.labels[bp.rows]),
                records=bp.records, padded=torch.tensor(bp.padded), epoch=bp.epoch, step=bp.step, rows=bp.rows,
            )
