"""Fixed 3D sin-cos position embedding, as in the V-JEPA reference; for a grid of one temporal slot (an image:
one frame, tubelet size 1) I-JEPA's 2D table, so the image model is I-JEPA's.

Token order is t-major: index = t * grid_h * grid_w + h * grid_w + w. This is the order of
`Conv3d(...)(x).flatten(2)` and the order the mask generator's indices use, so the two must change
together.
"""

from __future__ import annotations

import math

import numpy as np


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos embedding of positions.

    pos: [M] (float). Returns [M, dim] float64: concat(sin(pos * omega), cos(pos * omega)) with
    omega_i = 1 / 10000 ** (i / (dim / 2)), i = 0 .. dim/2 - 1 (sin block first, not interleaved).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.astype(np.float64).reshape(-1), omega)  # [M, dim/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def axis_dims(dim: int, uniform_power: bool = True) -> tuple[int, int, int]:
    """Channels given to the (t, h, w) axes before truncation to `dim`.

    uniform_power=True: each axis gets 2 * ceil(dim / 6), so 3 of them cover at least `dim` and the
    concatenation [t | h | w] is cut to `dim` (for D=1024 the last 2 channels of w's cos block go,
    for D=1280 the last 4).
    uniform_power=False: the reference's older split, t gets dim // 2 and h, w get dim // 4 each
    (time carries half the channels). Needs dim % 8 == 0 so every share is even and they sum to dim.
    """
    if uniform_power:
        d = 2 * math.ceil(dim / 6)
        return d, d, d
    if dim % 8:
        raise ValueError(f"non-uniform sin-cos split needs dim divisible by 8, got {dim}")
    return dim // 2, dim // 4, dim // 4


def sincos_pos_embed_3d(
    dim: int, grid_t: int, grid_h: int, grid_w: int, uniform_power: bool = True
) -> np.ndarray:
    """Fixed 3D sin-cos position table.

    Returns [grid_t * grid_h * grid_w, dim] float32, rows in t-major token order, columns
    [t-embedding | h-embedding | w-embedding] truncated to `dim` (see `axis_dims`).
    """
    if min(dim, grid_t, grid_h, grid_w) < 1:
        raise ValueError(
            f"dim and grid sizes must be positive, got dim={dim}, grid=({grid_t}, {grid_h}, {grid_w})"
        )
    if grid_t == 1:
        return sincos_pos_embed_2d(dim, grid_h, grid_w)
    t, h, w = np.meshgrid(
        np.arange(grid_t, dtype=np.float64),
        np.arange(grid_h, dtype=np.float64),
        np.arange(grid_w, dtype=np.float64),
        indexing="ij",  # [t, h, w] layout, so ravel() is the t-major token order
    )
    dt, dh, dw = axis_dims(dim, uniform_power)
    table = np.concatenate(
        [sincos_1d(dt, t.ravel()), sincos_1d(dh, h.ravel()), sincos_1d(dw, w.ravel())], axis=1
    )
    # Computed in float64 like the reference, stored as float32 like the model.
    return table[:, :dim].astype(np.float32)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """I-JEPA's (and MAE's) 2D sin-cos table: [grid_h * grid_w, dim] float32, rows in row-major token order,
    columns [embedding of the column index | embedding of the row index], dim / 2 each (the reference builds
    its grid with meshgrid(w, h), so its first half encodes w)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    h, w = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, w.ravel()), sincos_1d(dim // 2, h.ravel())], axis=1)
    return table.astype(np.float32)
