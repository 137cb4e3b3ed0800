"""Video Vision Transformer: tubelet embedding, fixed 3D sin-cos positions, pre-norm blocks.

Architecture only: no masking policy, no training logic. The context encoder drops tokens by
gathering the kept indices (`keep`) right after the position embedding is added, so each kept
token still carries its own position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig, as_model_config
from model.pos_embed import sincos_pos_embed_3d
from model.rope import RotaryTables

INIT_STD = 0.02
LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias). x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryTables | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D/heads]
        if rope is not None:  # rotary positions (pos_embed=rope) act on queries and keys only
            q, k = rope.apply(q), rope.apply(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    """Linear -> GELU -> Linear. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, mlp_hidden or 4 * dim)

    def forward(self, x: torch.Tensor, rope: RotaryTables | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class TubeletEmbed(nn.Module):
    """Non-overlapping tubelets to tokens. x: [B, C, T, H, W] -> [B, N, D], N = T'H'W' in t-major order."""

    def __init__(self, patch_size: int, tubelet_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, T', H', W'] -> [B, N, D]


def init_weights(module: nn.Module) -> None:
    """Reference init, for use with `Module.apply`: trunc-normal weights, zero biases, unit norms.

    The truncation bounds are +-2 in absolute value (torch's and the reference's default), i.e.
    effectively an untruncated normal at std 0.02; kept so init statistics match the reference.
    """
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def rescale_residual_projections(blocks: nn.ModuleList) -> None:
    """Divide each block's residual-branch output weights by sqrt(2 * layer_id), layer_id from 1 (init
    "depth_scaled"). Keeps the residual stream's variance from growing with depth at init (two branches per
    block). The official training script undoes it (it re-initialises every Linear after building the model):
    init "reference" leaves it out.
    """
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, recompute: bool, rope: RotaryTables | None = None
) -> torch.Tensor:
    """x through every block; with `recompute` (activation checkpointing) only each block's input is kept for
    the backward pass, which runs the block's forward again: when training, that is, when gradients flow.
    rope: the rotary tables of x's token positions (pos_embed=rope), shared by all blocks."""
    recompute = recompute and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope)
    return x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D], idx: [B, K] (int64 token indices) -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def check_index(name: str, idx: torch.Tensor, batch: int) -> None:
    """Shape/dtype check of an index tensor. Bounds are not checked: that would sync with the GPU
    every step; torch.gather / indexing raise on out-of-range indices (a device assert on CUDA)."""
    if idx.dim() != 2 or idx.size(0) != batch or idx.dtype != torch.int64:
        raise ValueError(
            f"{name}: expected an int64 tensor of shape [B={batch}, K], got {idx.dtype} {tuple(idx.shape)}"
        )


class VisionTransformer(nn.Module):
    """ViT over video tubelets, no CLS token.

    Input clips [B, 3, T, H, W] must have exactly the configured T=num_frames, H=W=img_size (the
    position table is not interpolated). The fixed sin-cos table is a non-persistent buffer: it is
    a pure function of the config, so it is neither trained nor stored in state_dicts. With
    pos_embed="rope" there is no table (pos_embed is None): V-JEPA 2's 3D rotary embedding in every attention
    layer carries the positions instead (model.rope).
    """

    def __init__(
        self,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: int = 16,
        tubelet_size: int = 2,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        uniform_power: bool = True,
        depth_scaled_init: bool = False,
        mlp_hidden: int = 0,
        activation_checkpointing: bool = False,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        if pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed must be sincos or rope, got {pos_embed!r}")
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(
                f"img_size={img_size} must be divisible by patch_size={patch_size} and "
                f"num_frames={num_frames} by tubelet_size={tubelet_size}"
            )
        self.img_size = img_size
        self.num_frames = num_frames
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.embed_dim = embed_dim
        self.activation_checkpointing = activation_checkpointing
        self.config: ModelConfig | None = None  # set by from_config; used by export / feature users
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_tokens = math.prod(self.grid)
        self.use_rope = pos_embed == "rope"
        self.num_heads = num_heads

        self.patch_embed = TubeletEmbed(patch_size, tubelet_size, embed_dim)
        if self.use_rope:
            self.pos_embed = None
        else:
            # torch.tensor (unlike from_numpy) follows a `with torch.device(...)` context, e.g. meta.
            pos = torch.tensor(sincos_pos_embed_3d(embed_dim, *self.grid, uniform_power=uniform_power))
            self.register_buffer("pos_embed", pos, persistent=False)  # [N, D]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

        self.apply(init_weights)
        if depth_scaled_init:
            rescale_residual_projections(self.blocks)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VisionTransformer":
        cfg = as_model_config(cfg)
        width, depth, heads = cfg.encoder_shape
        model = cls(
            img_size=cfg.img_size,
            num_frames=cfg.num_frames,
            patch_size=cfg.patch_size,
            tubelet_size=cfg.tubelet_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            uniform_power=cfg.uniform_power,
            depth_scaled_init=cfg.init == "depth_scaled",
            mlp_hidden=cfg.mlp_hidden,
            activation_checkpointing=cfg.activation_checkpointing,
            pos_embed=cfg.pos_embed,
        )
        model.config = cfg
        return model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tubelet tokens plus positions (sin-cos; with rope the tokens alone). x: [B, 3, T, H, W] -> [B, N, D]."""
        expected = (3, self.num_frames, self.img_size, self.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected clips of shape [B, {', '.join(map(str, expected))}] (B, C, T, H, W), "
                f"got {list(x.shape)}"
            )
        x = self.patch_embed(x)
        return x if self.pos_embed is None else x + self.pos_embed.to(x.dtype)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, 3, T, H, W]; keep: [B, K] int64 token indices or None.

        Returns [B, N, D] (keep=None) or [B, K, D], the kept tokens in the order given by `keep`.
        """
        x = self.embed(x)
        if keep is not None:
            check_index("keep", keep, x.size(0))
            x = gather_tokens(x, keep)
        rope = None
        if self.use_rope:  # kept tokens rotate by their own ids' positions
            ids = keep if keep is not None else torch.arange(self.num_tokens, device=x.device)
            rope = RotaryTables(ids, self.grid, self.embed_dim // self.num_heads, x.dtype)
        return self.norm(run_blocks(self.blocks, x, self.activation_checkpointing, rope))
