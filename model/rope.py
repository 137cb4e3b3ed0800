"""V-JEPA 2's 3D rotary position embedding (RoPE) over (frame, height, width), as the official `RoPEAttention`
computes it (src/models/utils/modules.py of facebookresearch/vjepa2).

Each attention head's channels are split into three equal even-sized parts d = 2 * ((head_dim // 3) // 2), rotated
by the token's frame, row and column index in that order; the head_dim - 3d channels left over are not rotated
(ViT-g: head_dim 64 -> 3 x 20 rotated, 4 passed through). A token's position comes from its token id in the full
t-major grid (index = t * H' * W' + h * W' + w), so context tokens kept by a mask and the predictor's mask tokens
keep their real positions.

The frequencies are the official ones including its quirk: the D/2 angles of a part are laid out as
[f_0 .. f_{D/2-1}, f_0 .. f_{D/2-1}] while the rotation pairs channels (2i, 2i+1), so a pair's two channels see
different angles. Released V-JEPA 2 weights were trained with it, so it is kept (their code notes the same).
The angles are computed in float32 and the cos / sin tables rounded to the queries' dtype; the official code
computes them in the queries' dtype (bf16 under autocast), so bf16 outputs differ from it at bf16 rounding, fp32
outputs not at all (tests/test_interop.py).
"""

from __future__ import annotations

import torch


def axis_part(head_dim: int) -> int:
    """Channels of a head rotated per axis (frame, height, width): the official 2 * ((head_dim // 3) // 2)."""
    return 2 * ((head_dim // 3) // 2)


def grid_positions(ids: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (t-major in `grid` = (T', H', W')) -> (frame, row, column) index tensors of the same shape."""
    _, grid_h, grid_w = grid
    per_frame = grid_h * grid_w
    frame = ids // per_frame
    rest = ids - frame * per_frame
    row = rest // grid_w
    return frame, row, rest - row * grid_w


class RotaryTables:
    """cos / sin tables of the three axes for one set of token positions, computed once per forward and used by
    every block. ids: [N] or [B, N] int64 token ids; head_dim: channels per head. Each table is [N, d] or
    [B, 1, N, d] so it broadcasts over [B, heads, N, d] queries and keys."""

    def __init__(self, ids: torch.Tensor, grid: tuple[int, int, int], head_dim: int, dtype: torch.dtype):
        self.part = axis_part(head_dim)
        if self.part == 0:
            raise ValueError(f"rope needs a head dim of at least 6, got {head_dim}")
        self.head_dim = head_dim
        half = self.part // 2
        omega = torch.arange(half, dtype=torch.float32, device=ids.device) / (self.part / 2.0)
        omega = 1.0 / 10000**omega  # [d/2], the official formula
        self.tables = []
        for pos in grid_positions(ids, grid):
            freq = pos.to(torch.float32).unsqueeze(-1) * omega  # [..., N, d/2]
            if freq.dim() == 3:
                freq = freq.unsqueeze(1)  # [B, 1, N, d/2]: the same positions for every head
            # The official expansion: [f, f] (concatenated), not each angle repeated per pair (see module doc).
            cos, sin = freq.cos(), freq.sin()
            self.tables.append((torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, heads, N, head_dim] queries or keys -> the same, rotated."""
        parts, s = [], 0
        for cos, sin in self.tables:
            y = x[..., s : s + self.part]
            pairs = y.unflatten(-1, (-1, 2))
            turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
            parts.append(y * cos + turned * sin)
            s += self.part
        if s < self.head_dim:
            parts.append(x[..., s:])
        return torch.cat(parts, dim=-1)
