"""The loaders a user would run instead of tubelet's, for `make bench-loader`: both read the raw video files (no
shards), one clip per DataLoader item, in DataLoader worker processes, as the official V-JEPA code does.

- decord, the way the official loader uses it (facebookresearch/jepa, src/datasets/video_dataset.py): per clip a
  fresh `VideoReader(path, num_threads=-1, ctx=cpu(0))`, `seek(0)`, `get_batch(indices).asnumpy()`.
- torchcodec, Meta's newer decoder: per clip a fresh `VideoDecoder(path, seek_mode="approximate")`,
  `get_frames_at(indices)`; `device="cuda"` (`make bench-gpu`) decodes with its CUDA decoder and runs the
  transform on the GPU, in the main process.

Then, per clip in the worker, the official `VideoTransform` (app/vjepa/transforms.py without auto-augment,
random erasing or motion shift, as its pretraining configs run it), which is torch ops already: the frames as
float32 [C, T, H, W], the crop window, `F.interpolate` bilinear (not antialiased) to the crop size, a
horizontal flip, the ImageNet normalisation in place. The batch's V-JEPA masks are drawn in the collate function
(the workers), as the official `MaskCollator` does.

The same sampling as tubelet's loaders (`pipeline.sampling.Plan` over the raw files' frame counts and sizes, the
clip stride in source frames): a random start and every `frame_stride`-th frame for `num_frames` frames, the
crop window and flip of `train_record`, the order and the masks of the same seed and positions. The official
code draws the same distributions from its global generators, and spaces its 16 indices by
`np.linspace(start, start + 64, 16)` (4.27 frames) where tubelet and this module take exactly 4.

Neither library says how many frames it decoded: `min_decoded_frames` is the least any seeking decoder decodes
for a clip (from the keyframe at or before its first frame through its last), read from the file's packets.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from bisect import bisect_right
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.clips import IMAGENET_MEAN, IMAGENET_STD, Batch, map_masks
from pipeline.config import LoaderConfig
from pipeline.sampling import BatchPlan, ClipRecord, Plan, frame_indices

PEERS = ("decord", "torchcodec")
MODULES = {"decord": "decord", "torchcodec": "torchcodec.decoders"}  # what using each imports


def availability(peer: str) -> Tuple[Optional[str], str]:
    """(version, "") when `peer` imports here; else (None, why: "not installed", or what failed loading it)."""
    try:
        importlib.import_module(MODULES[peer])
    except ImportError as e:
        if getattr(e, "name", None) and e.name.split(".")[0] == peer:
            return None, "not installed"
        return None, f"not loadable: {e}"
    except Exception as e:  # torchcodec raises RuntimeError when FFmpeg's shared libraries are missing
        return None, f"not loadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return importlib.metadata.version(peer), ""


@dataclass(frozen=True)
class RawVideo:
    """A raw input file as the peers see it: its frames, size, and the display indices of its keyframes."""

    path: str
    nframes: int
    height: int
    width: int
    fps: float
    keyframes: Tuple[int, ...]
    b_frames: bool  # frames stored out of display order (decode order != display order)


def probe_raw(path: str) -> RawVideo:
    """Frame count, size and keyframes of `path` from its packets (demuxed, nothing decoded)."""
    with av.open(path) as c:
        st = c.streams.video[0]
        pts, keys = [], []
        for pkt in c.demux(st):
            if pkt.pts is not None and pkt.size:
                pts.append(pkt.pts)
                keys.append(pkt.is_keyframe)
        w, h, fps = st.codec_context.width, st.codec_context.height, float(st.average_rate)
    order = np.argsort(pts, kind="stable")  # display index of each packet = its rank by pts
    display = np.empty(len(pts), np.int64)
    display[order] = np.arange(len(pts))
    keyframes = tuple(sorted(int(display[i]) for i, k in enumerate(keys) if k))
    return RawVideo(path, len(pts), h, w, fps, keyframes or (0,), bool(np.any(np.diff(pts) < 0)))


def min_decoded_frames(video: RawVideo, indices: Sequence[int]) -> int:
    """The frames a seeking decoder decodes at least for `indices`: from the keyframe at or before the first
    through the last."""
    first, last = min(indices), max(indices)
    keyframe = video.keyframes[max(0, bisect_right(video.keyframes, first) - 1)]
    return last - keyframe + 1


def read_decord(path: str, indices: List[int]) -> torch.Tensor:
    """The frames at `indices` as the official loader reads them: [T, H, W, 3] uint8."""
    from decord import VideoReader, cpu

    vr = VideoReader(path, num_threads=-1, ctx=cpu(0))
    vr.seek(0)  # the official loader goes to the start before sampling
    return torch.from_numpy(vr.get_batch(indices).asnumpy())


def read_torchcodec(path: str, indices: List[int], device: str = "cpu") -> torch.Tensor:
    """The frames at `indices` with torchcodec's decoder on `device` ("cuda": NVDEC): [T, H, W, 3] uint8 there."""
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(path, seek_mode="approximate", dimension_order="NHWC",
                        device=device).get_frames_at(indices=indices).data


READERS: Dict[str, Callable[[str, List[int]], torch.Tensor]] = {"decord": read_decord, "torchcodec": read_torchcodec}


def official_transform(frames: torch.Tensor, rec: ClipRecord, size: int) -> torch.Tensor:
    """The official `VideoTransform` on [T, H, W, 3] uint8 frames with the record's crop and flip: [3, T, size,
    size] float32, normalised."""
    buffer = frames.to(torch.float32).permute(3, 0, 1, 2)  # T H W C -> C T H W (the official converts first)
    i, j, h, w = rec.crop
    buffer = F.interpolate(buffer[:, :, i:i + h, j:j + w], size=(size, size), mode="bilinear", align_corners=False)
    if rec.flip:
        buffer = buffer.flip(-1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=buffer.device) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=buffer.device) * 255
    c, t, hh, ww = buffer.shape
    flat = buffer.view(c, -1).permute(1, 0)  # C last, normalised in place (_tensor_normalize_inplace)
    flat.sub_(mean).div_(std)
    return flat.permute(1, 0).view(c, t, hh, ww)


class _Clips(Dataset):
    """Item k: one clip, (path, record, batch number) -> (clip [3, T, S, S], batch number, min decoded frames)."""

    def __init__(self, read, videos: List[RawVideo], items: List[Tuple[int, ClipRecord, int]], num_frames: int,
                 stride: int, size: int):
        self.read, self.videos, self.items = read, videos, items
        self.num_frames, self.stride, self.size = num_frames, stride, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        row, rec, b = self.items[k]
        v = self.videos[row]
        indices = frame_indices(rec.start, v.nframes, self.num_frames, self.stride)
        clip = official_transform(self.read(v.path, indices), rec, self.size)
        return clip, b, min_decoded_frames(v, indices)


class _Collate:
    """The batch's clips stacked and its masks drawn, in the worker (the official MaskCollator's place)."""

    def __init__(self, plan: Plan, plans: List[BatchPlan], grid, specs):
        self.plan, self.plans, self.grid, self.specs = plan, plans, grid, specs

    def __call__(self, items):
        b = items[0][1]
        masks = map_masks(self.plan.masks(self.plans[b], self.grid, self.specs), torch.from_numpy)
        return torch.stack([clip for clip, _, _ in items]), b, masks, sum(n for _, _, n in items)


class PeerLoader:
    """Batches of `peer` (decord or torchcodec) over raw `videos`, with `cfg`'s clips and the sampling of the
    project (module docstring), through a DataLoader with `workers` processes. device="cuda": torchcodec's CUDA
    decoder and the transform on the GPU, in this process (CUDA does not survive a forked worker)."""

    def __init__(self, peer: str, videos: List[RawVideo], cfg: LoaderConfig, *, grid=None, workers: int = 0,
                 device: str = "cpu"):
        version, why = availability(peer)
        if version is None:
            raise RuntimeError(f"{peer} {why}")
        if device != "cpu" and (peer != "torchcodec" or workers):
            raise ValueError(f"device={device!r} is torchcodec's, in this process (workers=0); got {peer}, "
                             f"workers={workers}")
        self.peer, self.version, self.videos, self.cfg = peer, version, videos, cfg
        self.grid, self.workers, self.device = grid, workers, device
        self.plan = Plan([(v.nframes, v.height, v.width) for v in videos], batch_size=cfg.batch_size, seed=cfg.seed,
                         num_frames=cfg.num_frames, stride=cfg.frame_stride, scale=cfg.crop_scale,
                         ratio=cfg.crop_aspect, flip=cfg.flip)
        self.min_decoded_frames = 0  # the least a decoder decodes for the batches yielded so far

    def batches(self, num_batches: int):
        plans = [next(self.plan) for _ in range(num_batches)]
        items = [(row, rec, b) for b, bp in enumerate(plans) for row, rec in zip(bp.rows, bp.records)]
        per_batch, k = [], 0
        for bp in plans:
            per_batch.append(list(range(k, k + len(bp.rows))))
            k += len(bp.rows)
        read = READERS[self.peer] if self.device == "cpu" else partial(read_torchcodec, device=self.device)
        ds = _Clips(read, self.videos, items, self.cfg.num_frames, self.cfg.frame_stride, self.cfg.crop_size)
        dl = DataLoader(ds, batch_sampler=per_batch, num_workers=self.workers,
                        collate_fn=_Collate(self.plan, plans, self.grid, self.cfg.mask_specs(self.grid)),
                        pin_memory=torch.cuda.is_available() and self.device == "cpu",
                        prefetch_factor=2 if self.workers else None)
        for clips, b, masks, decoded in dl:
            bp = plans[b]
            self.min_decoded_frames += int(decoded)
            yield Batch(clips=clips, masks=masks, keys=[self.videos[r].path for r in bp.rows],
                        labels=torch.full((len(bp.rows),), -1, dtype=torch.int64), records=bp.records,
                        padded=torch.tensor(bp.padded), epoch=bp.epoch, step=bp.step, rows=bp.rows)
