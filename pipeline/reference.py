"""The reference loader: the same batches as `VideoLoader`, written plainly with a PyTorch DataLoader and PyAV
(PIL for image sets).

It shares only the sampling (pipeline/sampling.py, masks included) and the definition of a clip
(pipeline/clips.py) with the loader it checks, and decodes with FFmpeg instead of DALI.
It is the oracle of the loader tests and the baseline of `make bench-loader`; it is not meant to be fast.
"""

from __future__ import annotations

import io
from typing import Dict, List, Optional, Tuple

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.clips import DTYPES, Batch, cut_clip, map_masks
from pipeline.config import LoaderConfig
from pipeline.sampling import BatchPlan, ClipRecord, Plan, frame_indices
from pipeline.split_index import open_split, plan_for
from pipeline.store import store_for


def decode_frames(video: bytes, indices: List[int], fps: float = 0.0) -> Tuple[np.ndarray, int]:
    """Frames at `indices` (ascending, repeats allowed) as [F, H, W, 3] uint8, and how many frames were decoded
    for them. With the video's frame rate `fps`, decoding starts at the keyframe at or before the first index (a
    seek, as a decoder with a frame index does); without it, at the first frame."""
    first, last = min(indices), max(indices)
    got: Dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(io.BytesIO(video)) as c:
        st = c.streams.video[0]
        if fps and first > 0:
            # to the middle of the first frame's interval: its timestamp (rounded by the container) is at or before
            # that, the next frame's after it; backward: the keyframe at or before
            c.seek(int((first + 0.5) / fps / st.time_base), stream=st, backward=True, any_frame=False)
        for frame in c.decode(st):
            i = round(frame.time * fps) if fps else decoded
            decoded += 1
            if i > first and not got:  # the seek landed past the first frame wanted: decode from the start
                return decode_frames(video, indices)
            if i in indices:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    end = max(got)
    return np.stack([got.get(i, got[end]) for i in indices]), decoded


def make_clip(video: bytes, rec: ClipRecord, nframes: int, num_frames: int, stride: int, size: int,
              fps: float = 0.0) -> Tuple[torch.Tensor, int]:
    """One clip [3, T, size, size] float32 normalised, decoded with PyAV (seeking when `fps` is given) and cut by
    `clips.cut_clip`; and the number of frames decoded for it."""
    frames, decoded = decode_frames(video, frame_indices(rec.start, nframes, num_frames, stride), fps)
    return cut_clip(torch.from_numpy(frames), rec, size), decoded


def make_image_clip(data: bytes, rec: ClipRecord, size: int) -> torch.Tensor:
    """An image as a clip of one frame [3, 1, size, size], decoded with PIL and cut by `clips.cut_clip`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        frame = np.array(img.convert("RGB"))  # a writable copy
    return cut_clip(torch.from_numpy(frame)[None], rec, size)


class _Batches(Dataset):
    def __init__(self, cfg: LoaderConfig, plans: List[BatchPlan], grid, mask_plan: Plan):
        self.cfg, self.plans, self.grid, self.stride = cfg, plans, grid, mask_plan.stride
        self.masks = [mask_plan.masks(bp, grid, cfg.mask_specs(grid)) for bp in plans]
        self.index = None

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int):
        cfg, bp = self.cfg, self.plans[i]
        if self.index is None:  # opened lazily, once per worker process
            self.index = open_split(cfg.root, cfg.split, retry=cfg.retry_policy(), cache_dir=cfg.cache_dir)
            self.store = store_for(cfg)
            self.index.use_cache(self.store.cache)
        if self.index.kind == "image":
            made = [(make_image_clip(self.index.read_video(self.store, r), rec, cfg.crop_size), 1)
                    for r, rec in zip(bp.rows, bp.records)]
        else:
            made = [make_clip(self.index.read_video(self.store, r), rec, self.index.nframes(r),
                              cfg.num_frames, self.stride, cfg.crop_size, self.index.fps(r))
                    for r, rec in zip(bp.rows, bp.records)]
        return torch.stack([clip for clip, _ in made]), i, sum(n for _, n in made)


class ReferenceLoader:
    """`num_batches` batches for one rank from the current state, through a DataLoader with `workers` processes."""

    def __init__(self, cfg: LoaderConfig, *, grid: Optional[Tuple[int, int, int]] = None, rank: int = 0,
                 world_size: int = 1, train: bool = True, workers: int = 0, state: Optional[dict] = None):
        self.cfg, self.grid, self.workers = cfg, grid, workers
        self.index = open_split(cfg.root, cfg.split, cfg.verify_hashes, cfg.retry_policy(), cfg.cache_dir)
        self.plan = plan_for(self.index, cfg, rank=rank, world_size=world_size, train=train)
        if state is not None:
            self.plan.load_state_dict(state)
        self.decoded_frames = 0  # frames decoded for the batches yielded so far

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
        for clips, i, decoded in dl:
            bp = plans[i]
            self.decoded_frames += int(decoded)
            yield Batch(
                clips=clips.to(dtype),
                masks=map_masks(ds.masks[i], torch.from_numpy),
                keys=[self.index.key(r) for r in bp.rows],
                labels=torch.from_numpy(self.index.labels_of(bp.rows)),
                records=bp.records, padded=torch.tensor(bp.padded), epoch=bp.epoch, step=bp.step, rows=bp.rows,
            )
