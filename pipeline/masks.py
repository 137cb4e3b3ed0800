"""V-JEPA multi-block 3D masks over the tubelet token grid.

Each mask type (a ``MaskBlockConfig``) hides the union of ``num_blocks`` boxes of the (T', H', W') token
grid; the hidden tokens are the predictor's targets and the rest are the context the encoder sees.

Drawing follows the public reference (facebookresearch/jepa, ``src/masks/multiblock3d.py``):

- the block size is drawn once per batch and per mask type:
  spatial cells = int(spatial_scale * H'*W') (truncated, as the reference does: 29 and 137 at 14x14),
  aspect ratio uniform in linear space in [min, max] (not log-uniform),
  h = round(sqrt(cells * aspect)), w = round(sqrt(cells / aspect)), clipped to [1, H'] and [1, W'],
  temporal length = int(temporal_scale * T') clipped to [1, T'];
- block positions (temporal start, top, left) are uniform, per sample and per block;
- a sample whose blocks leave no context has all of its blocks redrawn;
- the index lists of a batch are cut to the batch minimum so they stack, keeping the lowest indices.
  After the cut, context + target can be fewer than T'*H'*W' tokens.

Token index order is t-major: index = t*H'*W' + h*W' + w.

Differences from the reference, none of which changes the distribution for scalar scales:
- everything comes from one ``np.random.Generator`` (the reference seeds a torch generator from a
  shared step counter for the size and uses the global torch RNG for positions);
- scales are scalars, so the reference's draws of a scale inside a (min, max) range are left out;
- redraws are bounded by ``max_redraws`` (the reference loops forever when a block fills the grid);
- h and w are also clipped from below to 1 (the reference only clips from above; this matters only for
  scales so small that a block would have no cells);
- the reference's unused ``max_keep`` and ``max_temporal_keep`` options are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from common.config import check

__all__ = [
    "MaskBlockConfig",
    "DEFAULT_MASKS",
    "default_masks",
    "BlockDraw",
    "block_size",
    "draw_blocks",
    "cut_to_indices",
    "sample_masks",
    "MaskSampler",
    "mask_fractions",
    "validate_spec",
]


@dataclass
class MaskBlockConfig:
    """One mask type: the union of ``num_blocks`` boxes of the token grid.

    spatial_scale: fraction of the H' x W' grid one block covers (0, 1].
    temporal_scale: fraction of the T' token slots one block spans (0, 1].
    aspect_ratio: [min, max] of the block's height / width, drawn uniformly once per batch.
    """

    num_blocks: int
    spatial_scale: float
    temporal_scale: float = 1.0
    aspect_ratio: List[float] = field(default_factory=lambda: [0.75, 1.5])

    def validate(self) -> None:
        validate_spec(self)


def validate_spec(spec) -> None:
    """Raises ConfigError naming the bad field. Accepts a MaskBlockConfig or an OmegaConf node of one."""
    check(int(spec.num_blocks) == spec.num_blocks and spec.num_blocks >= 1, "num_blocks",
          f"must be an integer >= 1, got {spec.num_blocks!r}")
    for name in ("spatial_scale", "temporal_scale"):
        value = getattr(spec, name)
        check(0.0 < float(value) <= 1.0, name, f"must be in (0, 1], got {value!r}")
    ar = list(spec.aspect_ratio)
    check(len(ar) == 2, "aspect_ratio", f"must be [min, max], got {ar!r}")
    check(float(ar[0]) > 0.0 and math.isfinite(float(ar[1])), "aspect_ratio",
          f"values must be positive and finite, got {ar!r}")
    check(float(ar[0]) <= float(ar[1]), "aspect_ratio", f"min must be <= max, got {ar!r}")


def default_masks() -> List[MaskBlockConfig]:
    """The V-JEPA pair: short-range (8 blocks x 15%) and long-range (2 blocks x 70%). Fresh copies."""
    return [
        MaskBlockConfig(num_blocks=8, spatial_scale=0.15, temporal_scale=1.0, aspect_ratio=[0.75, 1.5]),
        MaskBlockConfig(num_blocks=2, spatial_scale=0.70, temporal_scale=1.0, aspect_ratio=[0.75, 1.5]),
    ]


# A tuple so the module-level defaults cannot be appended to; use default_masks() for editable copies.
DEFAULT_MASKS = tuple(default_masks())


def _check_grid(grid: Sequence[int]) -> tuple:
    if len(grid) != 3 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid must be three positive integers (T', H', W'), got {tuple(grid)!r}")
    return tuple(int(g) for g in grid)


def block_size(spec, grid: Sequence[int], aspect: float) -> tuple:
    """Block size (t, h, w) in tokens for one aspect ratio (height / width), as the reference computes it."""
    T, H, W = grid
    # int() truncation and Python round() (half to even) are the reference's choices.
    cells = int(H * W * float(spec.spatial_scale))
    h = int(round(math.sqrt(cells * aspect)))
    w = int(round(math.sqrt(cells / aspect)))
    t = int(T * float(spec.temporal_scale))
    return (min(max(t, 1), T), min(max(h, 1), H), min(max(w, 1), W))


@dataclass
class BlockDraw:
    """The blocks of one mask type for one batch, before the cut to the batch minimum.

    size: (t, h, w) block size shared by the whole batch.
    aspect: the aspect ratio drawn for this batch.
    starts: [B, K, 3] int64 (t, top, left) of each block.
    masked: [B, N] bool, True where a token is inside a block (a target), N = T'*H'*W' in t-major order.
    redraws: number of samples redrawn because their blocks left no context.
    """

    size: tuple
    aspect: float
    starts: np.ndarray
    masked: np.ndarray
    redraws: int


def _paint(starts: np.ndarray, size: tuple, grid: tuple) -> np.ndarray:
    """[B, K, 3] block starts -> [B, N] bool union of the blocks."""
    T, H, W = grid
    t, h, w = size
    B, K, _ = starts.shape
    # Per-axis membership [B, K, axis_len], combined by broadcasting into [B, K, T, H*W].
    in_t = _span(starts[:, :, 0], t, T)
    in_h = _span(starts[:, :, 1], h, H)
    in_w = _span(starts[:, :, 2], w, W)
    spatial = (in_h[:, :, :, None] & in_w[:, :, None, :]).reshape(B, K, 1, H * W)
    blocks = in_t[:, :, :, None] & spatial  # [B, K, T, H*W]
    return blocks.any(axis=1).reshape(B, T * H * W)


def _span(start: np.ndarray, length: int, extent: int) -> np.ndarray:
    pos = np.arange(extent)
    return (pos >= start[..., None]) & (pos < start[..., None] + length)


def _draw_starts(rng: np.random.Generator, n: int, k: int, size: tuple, grid: tuple) -> np.ndarray:
    highs = np.array([g - s + 1 for g, s in zip(grid, size)], dtype=np.int64)
    return rng.integers(0, highs, size=(n, k, 3), dtype=np.int64)


def draw_blocks(
    rng: np.random.Generator,
    batch_size: int,
    grid: Sequence[int],
    spec,
    max_redraws: int = 100,
) -> BlockDraw:
    """Draws the blocks of one mask type for a batch (size once, positions per sample and block).

    Samples left with no context are redrawn (all their blocks), for at most ``max_redraws`` rounds;
    RuntimeError past that (e.g. a block that fills the whole grid).
    """
    grid = _check_grid(grid)
    validate_spec(spec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_redraws < 0:
        raise ValueError(f"max_redraws must be >= 0, got {max_redraws}")
    lo, hi = (float(a) for a in spec.aspect_ratio)
    aspect = lo + float(rng.random()) * (hi - lo)
    size = block_size(spec, grid, aspect)
    k = int(spec.num_blocks)

    starts = _draw_starts(rng, batch_size, k, size, grid)
    masked = _paint(starts, size, grid)
    redraws = 0
    for round_ in range(max_redraws + 1):
        empty = np.flatnonzero(masked.all(axis=1))  # samples with no context left
        if empty.size == 0:
            return BlockDraw(size=size, aspect=aspect, starts=starts, masked=masked, redraws=redraws)
        if round_ == max_redraws:
            break
        redraws += int(empty.size)
        starts[empty] = _draw_starts(rng, empty.size, k, size, grid)
        masked[empty] = _paint(starts[empty], size, grid)
    raise RuntimeError(
        f"mask {spec!r}: blocks of size {size} left no context after {max_redraws} redraw rounds "
        f"on grid {grid}; lower spatial_scale, temporal_scale or num_blocks"
    )


def _first_true(flags: np.ndarray, k: int) -> np.ndarray:
    """[B, N] bool with >= k True per row -> [B, k] int64, the k lowest True positions per row, ascending."""
    B, N = flags.shape
    keep = flags & (np.cumsum(flags, axis=1, dtype=np.int32) <= k)
    # Flat positions come out row by row (k per row); subtracting the row offset leaves token indices.
    flat = np.flatnonzero(keep).reshape(B, k)
    return flat - (np.arange(B, dtype=np.int64) * N)[:, None]


def cut_to_indices(masked: np.ndarray) -> tuple:
    """[B, N] bool target mask -> (context_idx [B, Nc], target_idx [B, Nt]) int64, sorted per row.

    Nc and Nt are the batch minimum counts; each row keeps its lowest indices (as the reference).
    """
    n_target = masked.sum(axis=1)
    nt = int(n_target.min())
    nc = int(masked.shape[1] - n_target.max())
    return _first_true(~masked, nc), _first_true(masked, nt)


def sample_masks(
    rng: np.random.Generator,
    batch_size: int,
    grid: Sequence[int],
    specs: Sequence,
    max_redraws: int = 100,
) -> List[tuple]:
    """One (context_idx [B, Nc], target_idx [B, Nt]) int64 pair per mask type in ``specs``.

    Indices are t-major over the (T', H', W') grid; rows are sorted ascending and disjoint within a
    sample; every sample keeps some context. A pure function of the generator state.
    """
    return [cut_to_indices(draw_blocks(rng, batch_size, grid, s, max_redraws).masked) for s in specs]


class MaskSampler:
    """Holds the mask types and the grid; call with a generator and a batch size."""

    def __init__(self, specs: Sequence = DEFAULT_MASKS, grid: Sequence[int] = (8, 14, 14), max_redraws: int = 100):
        self.grid = _check_grid(grid)
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("specs must hold at least one mask type")
        for s in self.specs:
            validate_spec(s)
        self.max_redraws = max_redraws

    @property
    def num_tokens(self) -> int:
        T, H, W = self.grid
        return T * H * W

    def __call__(self, rng: np.random.Generator, batch_size: int) -> List[tuple]:
        return sample_masks(rng, batch_size, self.grid, self.specs, self.max_redraws)


def mask_fractions(rng: np.random.Generator, batch_size: int, grid: Sequence[int], spec, batches: int) -> dict:
    """Masking statistics of one mask type over ``batches`` batches (for tests and sanity checks).

    before: mean masked (target) fraction per sample, before the cut to the batch minimum;
    after: mean fraction of tokens hidden from the context encoder after the cut, 1 - Nc / N;
    target_after: mean Nt / N after the cut;
    redraw_rate: sample draws rejected for leaving no context over all sample draws (a sample can be
        redrawn more than once). For the long-range default this is E[p/(1-p)] / E[1/(1-p)] ~ 1.95% in
        expectation, where p(aspect) is the chance one draw covers the grid; E[p] ~ 1.83% is the note's 1.8%.
    """
    grid = _check_grid(grid)
    n = grid[0] * grid[1] * grid[2]
    before, after, target_after, redraws = [], [], [], 0
    for _ in range(batches):
        d = draw_blocks(rng, batch_size, grid, spec)
        ctx, tgt = cut_to_indices(d.masked)
        before.append(d.masked.mean(axis=1))
        after.append(1.0 - ctx.shape[1] / n)
        target_after.append(tgt.shape[1] / n)
        redraws += d.redraws
    return {
        "before": float(np.concatenate(before).mean()),
        "after": float(np.mean(after)),
        "target_after": float(np.mean(target_after)),
        "redraw_rate": redraws / (batches * batch_size + redraws),
    }
