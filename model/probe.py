"""The frozen-evaluation heads: an attentive probe over all of an encoder's output tokens (V-JEPA's), and a
linear probe on their average (I-JEPA's, `LinearProbe`, at the end).

One cross-attention block whose single learnable query attends to the (frozen) tokens, then a linear
classifier. tokens: [B, N, D] -> logits [B, C].

Two variants (`variant`): "reference" computes exactly what the official evaluation computes
(facebookresearch/jepa, src/models/attentive_pooler.py): its cross-attention holds an output projection that it
never applies, and its LayerNorms use torch's default eps 1e-5; probe numbers are comparable with the paper's.
"tubelet" applies the projection (a standard attention block) with the encoder's eps 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.vit import LN_EPS, MLP


class CrossAttention(nn.Module):
    """queries [B, Q, D] attend to x [B, N, D] -> [B, Q, D]. Without `proj`, the heads' outputs are returned as
    they are (the reference's computation)."""

    def __init__(self, dim: int, num_heads: int, proj: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def forward(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        Q, h = queries.shape[1], self.num_heads
        q = self.q(queries).reshape(B, Q, h, D // h).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, Q, D/h]
        return self.proj(out.transpose(1, 2).reshape(B, Q, D))


VARIANTS = ("reference", "tubelet")


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int = 12, mlp_ratio: float = 4.0,
                 variant: str = "reference"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a probe needs at least 2 classes, got {num_classes}")
        if variant not in VARIANTS:
            raise ValueError(f"probe variant must be one of {VARIANTS}, got {variant!r}")
        eps = 1e-5 if variant == "reference" else LN_EPS
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads, proj=variant == "tubelet")
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # residual branches start small, as the reference's pooler does (its rescale of layer 1)
        if isinstance(self.attn.proj, nn.Linear):
            self.attn.proj.weight.data.div_(math.sqrt(2.0))
        self.mlp.fc2.weight.data.div_(math.sqrt(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        q = q + self.attn(q, self.norm1(tokens))
        q = q + self.mlp(self.norm2(q))
        return self.head(q[:, 0])


class LinearProbe(nn.Module):
    """I-JEPA's linear evaluation head: the tokens average-pooled, batch-normalised without affine parameters
    (MAE's linear-probe recipe, which I-JEPA's evaluation follows), then one linear layer. tokens [B, N, D] ->
    logits [B, C]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a probe needs at least 2 classes, got {num_classes}")
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(tokens.mean(1)))
