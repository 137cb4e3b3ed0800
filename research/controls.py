"""Controls of the learning proof: what a probe reads without a pretrained encoder."""

from __future__ import annotations

import torch


class FrameDifferenceTokens(torch.nn.Module):
    """A control in place of an encoder: each token is the raw temporal difference of one 2x16x16 tubelet
    (768 numbers), i.e. local motion with no learning. What the probe can read from local motion alone."""

    embed_dim, num_heads = 768, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, T, S, S] -> [B, T/2 * (S/16)^2, 768]
        d = x[:, :, 1::2] - x[:, :, 0::2]
        B, C, T, S, _ = d.shape
        d = d.reshape(B, C, T, S // 16, 16, S // 16, 16).permute(0, 2, 3, 5, 1, 4, 6)
        return d.reshape(B, T * (S // 16) ** 2, C * 256)
