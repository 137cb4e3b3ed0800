"""I-JEPA multi-block masks over a 2D patch grid: one context block with the target blocks removed from it, and
`num_pred` target blocks, each predicted on its own.

Drawing follows the official collator value for value (facebookresearch/ijepa, ``src/masks/multiblock.py``,
the IN-1k ViT-H/14 recipe's settings as defaults):

- per batch, one target block size and one context block size: a single uniform draw u sets both the scale
  (min + u (max - min)) and the aspect ratio (min + u (max - min)) of a size (the reference reuses its one
  draw); cells = int(H' W' scale), h = round(sqrt(cells aspect)), w = round(sqrt(cells / aspect)), each
  decreased until it is below the grid's side; the context block has aspect 1;
- per sample, the target blocks first (top-left uniform in [0, H' - h) x [0, W' - w): the reference's exclusive
  bound, so a block never reaches the last row or column), then the context block, restricted to the cells
  outside every target block; a block with `min_keep` cells or fewer after the restriction is redrawn, and
  after 20 failed draws the restriction drops the last target block's region (then the next, ...);
- the index lists of a batch are cut to the batch minimum so they stack (per kind: context, targets),
  keeping the lowest indices.

Token index order is row-major: index = h * W' + w (the video grid's with T' = 1). Differences from the
reference: one ``np.random.Generator`` per batch (a pure function of the batch's position, like every other
draw of the project) instead of a torch generator seeded from a shared step counter plus the global torch RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from common.config import check

_TIMEOUT = 20  # failed draws before the restriction is loosened by one target region (the reference's)


@dataclass
class ImageMaskConfig:
    """I-JEPA's mask settings (the IN-1k ViT-H/14 recipe)."""

    enc_scale: List[float] = field(default_factory=lambda: [0.85, 1.0])  # context block, fraction of the grid
    pred_scale: List[float] = field(default_factory=lambda: [0.15, 0.2])  # each target block
    aspect_ratio: List[float] = field(default_factory=lambda: [0.75, 1.5])  # target blocks (context: 1)
    num_pred: int = 4  # target blocks per image
    min_keep: int = 10  # a block keeps more than this many cells
    allow_overlap: bool = False  # true: the context may include target cells

    def validate(self) -> None:
        for key in ("enc_scale", "pred_scale", "aspect_ratio"):
            lo_hi = getattr(self, key)
            check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], key, "must be [min, max] with 0 < min <= max")
        check(self.enc_scale[1] <= 1 and self.pred_scale[1] <= 1, "enc_scale", "scales must be <= 1")
        check(self.num_pred >= 1 and self.min_keep >= 0, "num_pred", "num_pred >= 1, min_keep >= 0")


def block_size(u: float, grid: Tuple[int, int], scale: Sequence[float], aspect: Sequence[float]) -> Tuple[int, int]:
    """(h, w) of a block from one uniform draw `u` (the reference's `_sample_block_size`)."""
    height, width = grid
    cells = int(height * width * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(cells * ratio))), int(round(math.sqrt(cells / ratio)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


def _block(rng: np.random.Generator, size: Tuple[int, int], grid: Tuple[int, int], min_keep: int,
           regions: Sequence[np.ndarray] = ()) -> Tuple[np.ndarray, np.ndarray]:
    """One block's cell indices (restricted to `regions`) and the complement of the unrestricted block."""
    (h, w), (height, width) = size, grid
    if h * w <= min_keep:  # the reference would draw forever
        raise ValueError(f"a mask block of {h}x{w} cells on a {height}x{width} patch grid never keeps more than "
                         f"data.image_masks.min_keep={min_keep}: lower min_keep or raise the scales")
    tries, timeout = 0, _TIMEOUT
    while True:
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        mask = np.zeros((height, width), bool)
        mask[top:top + h, left:left + w] = True
        for region in regions[:max(len(regions) - tries, 0)]:
            mask &= region
        idx = np.flatnonzero(mask)
        if len(idx) > min_keep:
            break
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, _TIMEOUT
    complement = np.ones((height, width), bool)
    complement[top:top + h, left:left + w] = False
    return idx, complement


def sample_image_masks(rng: np.random.Generator, batch_size: int, grid: Sequence[int],
                       cfg: ImageMaskConfig) -> Tuple[np.ndarray, List[np.ndarray]]:
    """One batch's masks on the (H', W') patch grid (or (1, H', W')): the context [B, Nc] and `num_pred`
    target index arrays [B, Nt], int64, cut to the batch minimum."""
    grid = tuple(int(g) for g in grid)
    if len(grid) == 3:
        if grid[0] != 1:
            raise ValueError(f"image masks need a grid of one temporal slot, got {grid}")
        grid = grid[1:]
    pred_size = block_size(float(rng.random()), grid, cfg.pred_scale, cfg.aspect_ratio)
    enc_size = block_size(float(rng.random()), grid, cfg.enc_scale, (1.0, 1.0))
    contexts, targets = [], []
    for _ in range(batch_size):
        blocks = [_block(rng, pred_size, grid, cfg.min_keep) for _ in range(cfg.num_pred)]
        targets.append([idx for idx, _ in blocks])
        regions = () if cfg.allow_overlap else [comp for _, comp in blocks]
        contexts.append(_block(rng, enc_size, grid, cfg.min_keep, regions)[0])
    keep_ctx = min(len(c) for c in contexts)
    keep_tgt = min(len(t) for ts in targets for t in ts)
    context = np.stack([c[:keep_ctx] for c in contexts]).astype(np.int64)
    return context, [np.stack([ts[k][:keep_tgt] for ts in targets]).astype(np.int64) for k in range(cfg.num_pred)]
