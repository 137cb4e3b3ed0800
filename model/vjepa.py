"""V-JEPA: context encoder + predictor trained to match an EMA target encoder's features."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, as_model_config
from model.predictor import Predictor
from model.vit import VisionTransformer, gather_tokens

# One entry per mask type: (ctx_idx [B, Nc], tgt_idx [B, Nt]), int64 token indices.
Masks = Sequence[tuple[torch.Tensor, torch.Tensor]]


LOSSES = ("l1", "smooth_l1")


def jepa_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kind: str = "l1") -> torch.Tensor:
    """The objective per mask type, averaged over mask types: L1 (V-JEPA) or smooth L1 with beta 1 (I-JEPA's
    F.smooth_l1_loss over its target blocks, which have equal sizes after the batch cut: the same mean).

    The mean reduces over B * Nt * D values (~1.3M at ViT-L scale): accumulated in fp32.
    """
    if kind == "l1":
        per = [torch.mean(torch.abs(p.float() - t)) for p, t in zip(preds, targets)]
    elif kind == "smooth_l1":
        per = [F.smooth_l1_loss(p.float(), t.float()) for p, t in zip(preds, targets)]
    else:
        raise ValueError(f"loss {kind!r}: one of {LOSSES}")
    return torch.stack(per).mean()


class VJEPA(nn.Module):
    """Holds the three networks and computes the loss; the optimizer, schedules and EMA timing
    belong to the trainer.

    The target encoder is a frozen copy of the encoder (requires_grad False) updated only by
    `ema_update`. It always runs in eval mode (`train()` keeps it there), so its outputs never
    depend on the trainer's train/eval switches.
    """

    def __init__(self, encoder: VisionTransformer, predictor: Predictor, loss: str = "l1"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: one of {LOSSES}")
        self.loss = loss
        if predictor.embed_dim != encoder.embed_dim or predictor.grid != encoder.grid:
            raise ValueError(
                f"predictor (width {predictor.embed_dim}, grid {predictor.grid}) does not match "
                f"encoder (width {encoder.embed_dim}, grid {encoder.grid})"
            )
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VJEPA":
        cfg = as_model_config(cfg)
        return cls(VisionTransformer.from_config(cfg), Predictor.from_config(cfg), cfg.loss)

    def train(self, mode: bool = True) -> "VJEPA":
        super().train(mode)
        self.target_encoder.eval()
        return self

    @torch.no_grad()
    def target_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: [B, 3, T, H, W] -> [B, N, D]: the target encoder's features of every token, layer-normed
        without affine parameters (per token, over D), in fp32 even under bf16 autocast. The targets come from
        these; the collapse signals read them too."""
        h = self.target_encoder(clips)  # [B, N, D]
        return F.layer_norm(h.float(), (h.size(-1),))

    @staticmethod
    def gather_targets(features: torch.Tensor, masks: Masks) -> list[torch.Tensor]:
        """[B, N, D] target features -> one [B, Nt_i, D] target tensor per mask type."""
        return [gather_tokens(features, tgt_idx) for _, tgt_idx in masks]

    @torch.no_grad()
    def forward_target(self, clips: torch.Tensor, masks: Masks) -> list[torch.Tensor]:
        """clips: [B, 3, T, H, W] -> one [B, Nt_i, D] target tensor per mask type.

        The target encoder sees every token once per clip; targets are its layer-normed outputs
        (`target_features`), gathered at each mask type's targets.
        """
        return self.gather_targets(self.target_features(clips), masks)

    def forward_context(self, clips: torch.Tensor, masks: Masks) -> list[torch.Tensor]:
        """clips: [B, 3, T, H, W] -> one [B, Nt_i, D] prediction per mask type.

        The encoder runs once per distinct context (on the context tokens only; I-JEPA's target blocks share
        one context tensor), the predictor once per mask type on those features plus mask tokens at the target
        positions: mask type i's token, or the one token of a predictor that has one (I-JEPA's).
        """
        preds, encoded = [], []  # (ctx_idx, its features) per distinct context tensor
        for mask_type, (ctx_idx, tgt_idx) in enumerate(masks):
            # identity, not id(): under torch.compile an `is` between two inputs is an aliasing guard that holds
            # from step to step, while id() would be a constant guarded by object identity (a recompile per step)
            feats = next((f for c, f in encoded if c is ctx_idx), None)
            if feats is None:
                feats = self.encoder(clips, keep=ctx_idx)  # [B, Nc, D]
                encoded.append((ctx_idx, feats))
            token = mask_type if self.predictor.num_mask_types > 1 else 0
            preds.append(self.predictor(feats, ctx_idx, tgt_idx, token))
        return preds

    def forward(self, clips: torch.Tensor, masks: Masks) -> torch.Tensor:
        """clips: [B, 3, T, H, W]; masks: [(ctx_idx [B, Nc], tgt_idx [B, Nt]), ...] one pair per mask
        type. Returns the scalar loss (`self.loss`) per mask type, averaged over mask types."""
        if not masks or (self.predictor.num_mask_types > 1 and len(masks) > self.predictor.num_mask_types):
            raise ValueError(
                f"got {len(masks)} mask types, the predictor has {self.predictor.num_mask_types} mask tokens"
            )
        return jepa_loss(self.forward_context(clips, masks), self.forward_target(clips, masks), self.loss)

    @torch.no_grad()
    def ema_update(self, momentum: float, skip: torch.Tensor | None = None) -> None:
        """target <- m * target + (1 - m) * encoder over parameters (buffers are fixed tables), as the reference
        computes it (`mul_(m).add_((1 - m) * encoder)`), in fused passes over the tensor lists. skip: a 0-d flag on
        the parameters' device, 1 = leave the target bitwise as it is (a step whose update was skipped): the
        weights become m' = 1 and 1 - m' = 0, computed there, so the host never reads the flag (a 0-d tensor passed
        where torch takes a Python number, as `_foreach_lerp_`'s weight, is read on the host: a sync per step)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        tgt = list(self.target_encoder.parameters())
        src = list(self.encoder.parameters())
        if skip is None:
            torch._foreach_mul_(tgt, momentum)
            torch._foreach_add_(tgt, torch._foreach_mul(src, 1.0 - momentum))
            return
        keep = skip.to(tgt[0].dtype)
        m = momentum + (1.0 - momentum) * keep  # [0-d] on the device: m, or 1 on a skipped step
        torch._foreach_mul_(tgt, m)  # the Tensor overloads take the 0-d device tensor as it is
        torch._foreach_add_(tgt, torch._foreach_mul(src, 1.0 - m))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups for the encoder and predictor (never the target encoder).

        Biases and 1-D parameters (norm scales and shifts) get no weight decay. Each group carries
        `name` and `apply_wd` so a weight-decay schedule can update only the decayed groups.
        """
        groups = []
        for module_name, module in (("encoder", self.encoder), ("predictor", self.predictor)):
            decay, no_decay = [], []
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
            groups += [
                {"name": f"{module_name}.decay", "params": decay, "weight_decay": weight_decay, "apply_wd": True},
                {"name": f"{module_name}.no_decay", "params": no_decay, "weight_decay": 0.0, "apply_wd": False},
            ]
        return [g for g in groups if g["params"]]
