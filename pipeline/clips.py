"""What the loaders yield, shared by the DALI loader and its PyAV reference: the `Batch` (and the `LoaderStats` the
DALI loader reports with each), the clip dtypes, the normalisation, and `cut_clip`, the plain-torch definition of a clip (what the DALI graph computes).

A clip is `num_frames` frames from `sampling.frame_indices`, cut to the record's crop window, resized to
`size x size` (bilinear, antialiased), flipped when the record says so, and normalised with the ImageNet
mean and std: [3, T, size, size].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from pipeline.cache import CacheStats
from pipeline.sampling import ClipRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Batch:
    clips: torch.Tensor  # [B, 3, T, H, W], normalised, on the training device
    masks: List[Tuple[torch.Tensor, torch.Tensor]]  # per mask type: (context [B, Nc], target [B, Nt]) int64
    keys: List[str]
    labels: torch.Tensor  # [B] int64, -1 when unlabelled
    records: List[ClipRecord]
    padded: torch.Tensor  # [B] bool: a repeat that fills a rank's last step of an epoch
    epoch: int
    step: int
    rows: List[int] = field(default_factory=list)
    decoded_frames: int = 0  # frames the decoder decodes for this batch (the DALI loader; 0 where not counted)


@dataclass
class LoaderStats:
    """Per batch, for the metrics backend: where the time went and how much was read."""

    wait_seconds: float  # the consumer blocked in next()
    feed_seconds: float  # reading encoded videos + sampling + masks (Python side)
    latency_seconds: float  # from feeding the batch to DALI to handing it to the consumer
    bytes_read: int
    samples: int
    padded: int
    queue_depth: int  # batches in flight after this one was taken
    epoch: int
    position: int
    corrupt: int = 0  # samples that failed their checksum and were replaced (data.on_corrupt=skip)
    cache: Optional[CacheStats] = None  # remote sets: the shard cache's counters so far (cumulative)


def map_masks(masks, fn):
    """`fn` applied to every mask tensor (or array) once per distinct object: mask types that share a context
    (I-JEPA's target blocks) keep sharing one, so the model encodes that context once."""
    done = {}

    def one(t):
        if id(t) not in done:
            done[id(t)] = fn(t)
        return done[id(t)]

    return [(one(c), one(t)) for c, t in masks]


def masks_to(masks: List[Tuple[torch.Tensor, torch.Tensor]], device, non_blocking: bool = True):
    """The batch's masks on `device` (`map_masks`: a shared context stays shared)."""
    return map_masks(masks, lambda t: t.to(device, non_blocking=non_blocking))


def cut_clip(frames: torch.Tensor, rec: ClipRecord, size: int) -> torch.Tensor:
    """frames [T, H, W, 3] uint8 (the clip's frames, any device) -> [3, T, size, size] float32, normalised."""
    y0, x0, h, w = rec.crop
    x = frames[:, y0:y0 + h, x0:x0 + w].permute(0, 3, 1, 2).float()  # [T, 3, h, w]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if rec.flip:
        x = x.flip(-1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()  # [3, T, H, W]
