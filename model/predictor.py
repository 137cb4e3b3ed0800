"""Narrow transformer that predicts target-token features from context features.

Context features are mapped to the predictor width and given their positions; each target
position gets the learnable mask token of the current mask type plus its position. Both run
through the blocks together and only the target outputs are projected back to the encoder width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig, as_model_config
from model.pos_embed import sincos_pos_embed_3d
from model.rope import RotaryTables
from model.vit import LN_EPS, Block, check_index, init_weights, rescale_residual_projections, run_blocks


class Predictor(nn.Module):
    """V-JEPA predictor.

    embed_dim: encoder width D; grid: token grid (T', H', W') of the encoder, which fixes the
    index space of ctx_idx / tgt_idx (t-major, see model.pos_embed).
    """

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int, int],
        width: int = 384,
        depth: int = 12,
        heads: int = 12,
        num_mask_types: int = 2,
        uniform_power: bool = True,
        depth_scaled_init: bool = False,
        activation_checkpointing: bool = False,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        if pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed must be sincos or rope, got {pos_embed!r}")
        self.use_rope = pos_embed == "rope"
        self.head_dim = width // heads
        self.embed_dim = embed_dim
        self.activation_checkpointing = activation_checkpointing
        self.width = width
        self.grid = tuple(grid)
        self.num_tokens = math.prod(self.grid)
        self.num_mask_types = num_mask_types

        self.predictor_embed = nn.Linear(embed_dim, width)
        # One token per mask type: short- and long-range masks hide differently shaped regions,
        # so the predictor is told which kind it is filling in. Zero-init as in the reference.
        self.mask_tokens = nn.Parameter(torch.zeros(num_mask_types, 1, 1, width))
        if self.use_rope:  # positions enter each attention layer instead (model.rope)
            self.pos_embed = None
        else:
            # torch.tensor (unlike from_numpy) follows a `with torch.device(...)` context, e.g. meta.
            pos = torch.tensor(sincos_pos_embed_3d(width, *self.grid, uniform_power=uniform_power))
            self.register_buffer("pos_embed", pos, persistent=False)  # [N, width]
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.predictor_proj = nn.Linear(width, embed_dim)

        self.apply(init_weights)  # leaves mask_tokens at zero: apply() only visits submodules
        if depth_scaled_init:
            rescale_residual_projections(self.blocks)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Predictor":
        cfg = as_model_config(cfg)
        return cls(
            embed_dim=cfg.encoder_width,
            grid=cfg.grid,
            width=cfg.predictor_width,
            depth=cfg.predictor_depth,
            heads=cfg.predictor_num_heads,
            num_mask_types=cfg.num_mask_types,
            uniform_power=cfg.uniform_power,
            depth_scaled_init=cfg.init == "depth_scaled",
            activation_checkpointing=cfg.activation_checkpointing,
            pos_embed=cfg.pos_embed,
        )

    def forward(
        self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, mask_type: int
    ) -> torch.Tensor:
        """ctx: [B, Nc, D] context features; ctx_idx: [B, Nc] and tgt_idx: [B, Nt] int64 token
        indices; mask_type in [0, num_mask_types). Returns [B, Nt, D], predictions in tgt_idx order."""
        B, Nc, _ = ctx.shape
        if not 0 <= mask_type < self.num_mask_types:
            raise ValueError(
                f"mask_type {mask_type} out of range, the predictor has {self.num_mask_types} mask tokens"
            )
        check_index("ctx_idx", ctx_idx, B)
        check_index("tgt_idx", tgt_idx, B)
        if ctx_idx.size(1) != Nc:
            raise ValueError(f"ctx_idx has {ctx_idx.size(1)} indices for {Nc} context tokens")

        x = self.predictor_embed(ctx)
        tgt = self.mask_tokens[mask_type].expand(B, tgt_idx.size(1), -1)
        rope = None
        if self.use_rope:
            # Context and mask tokens rotate by their token ids' (t, h, w). The official predictor also sorts the
            # tokens by id first; attention does not depend on token order, so that is left out.
            rope = RotaryTables(torch.cat([ctx_idx, tgt_idx], dim=1), self.grid, self.head_dim, x.dtype)
        else:
            x = x + self.pos_embed[ctx_idx].to(x.dtype)  # [N, W][B, Nc] -> [B, Nc, W]
            tgt = tgt + self.pos_embed[tgt_idx].to(tgt.dtype)
        x = torch.cat([x, tgt.to(x.dtype)], dim=1)  # [B, Nc + Nt, W]
        x = run_blocks(self.blocks, x, self.activation_checkpointing, rope)
        x = self.norm(x[:, Nc:])  # LayerNorm is per token, so normalising only the targets is equivalent
        return self.predictor_proj(x)

