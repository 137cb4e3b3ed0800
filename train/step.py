"""The training step and what it needs: `build` makes the networks and the optimizer once, `train_step` makes one
optimizer update. Research harnesses and benchmarks call these same two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.vjepa import VJEPA, l1_loss
from pipeline.clips import Batch
from train import dist, schedules
from train.config import TrainConfig
from train.signals import SIGNAL_CLIPS, feature_signals


class Student(nn.Module):
    """The trained networks, encoder + predictor, as one module: DDP wraps exactly these, with one forward
    per backward. clips [B, 3, T, H, W], masks [(ctx [B, Nc], tgt [B, Nt])] -> [B, Nt, D] per mask type."""

    def __init__(self, model: VJEPA):
        super().__init__()
        self.encoder, self.predictor = model.encoder, model.predictor

    # the model's own context path (it reads only self.encoder and self.predictor): one definition of it
    forward = VJEPA.forward_context


@dataclass
class Parts:
    """What the step needs: built once by `build`."""

    cfg: TrainConfig
    env: dist.DistEnv
    model: VJEPA  # encoder, predictor, target encoder (unwrapped: checkpoints and EMA use these)
    student: nn.Module  # Student, DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    amp: bool  # bf16 autocast

    def named_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every parameter of the three networks, named: what must be identical on every rank."""
        for part in ("encoder", "predictor", "target_encoder"):
            for name, t in getattr(self.model, part).named_parameters():
                yield f"{part}.{name}", t


@dataclass
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float  # encoder and predictor together, before clipping
    lr: float
    weight_decay: float
    ema: float
    nonfinite: bool  # the update was not applied
    signals: Optional[Dict[str, float]] = None  # collapse signals (train.signals), "target_*" and "pred_*"


def grad_norm_(params: List[nn.Parameter], clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients; scaled down to `clip` when clip > 0 and the norm exceeds it."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def train_step(p: Parts, batch: Batch, step: int, force_nan: bool = False, signals: bool = False) -> StepResult:
    """One optimizer update (step counted from 1). Applies nothing when the loss or gradients are non-finite
    on any rank; the caller decides to stop or skip. With `signals`, also the collapse signals of this step's
    target features and predictions, on the batch's first few clips."""
    o, horizon = p.cfg.optim, p.cfg.schedule.horizon
    lr = schedules.lr(step, peak=o.lr, start=o.start_lr, final=o.final_lr, warmup=o.warmup_steps, horizon=horizon)
    wd = schedules.weight_decay(step, start=o.weight_decay, final=o.final_weight_decay, horizon=horizon)
    ema = schedules.ema_momentum(step - 1, start=o.ema_start, end=o.ema_end, horizon=horizon)
    for group in p.optimizer.param_groups:
        group["lr"] = lr
        if group["apply_wd"]:  # biases and norm parameters keep 0
            group["weight_decay"] = wd

    dev = p.env.device
    clips = batch.clips.to(dev, non_blocking=True)  # [B, 3, T, H, W]
    clips = clips if p.amp else clips.float()
    masks = [(c.to(dev, non_blocking=True), t.to(dev, non_blocking=True)) for c, t in batch.masks]
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.amp):
        features = p.model.target_features(clips)  # [B, N, D], no grad
        targets = p.model.gather_targets(features, masks)  # [B, Nt, D] per mask type
        preds = p.student(clips, masks)  # [B, Nt, D] per mask type; DDP all-reduces grads in backward
        loss = l1_loss(preds, targets)
    if force_nan:
        loss = loss * float("nan")
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()

    clip = o.clip_grad if step > o.clip_start else 0.0  # the reference clips only after its warm-up epochs
    norm = torch.hypot(grad_norm_(list(p.model.encoder.parameters()), clip),
                       grad_norm_(list(p.model.predictor.parameters()), clip))
    # The one sync point of the step (.item()): every rank must agree on the NaN guard before the optimizer
    # touches the weights. Gradients are identical on all ranks after DDP; losses are summed for the log.
    loss32 = loss.detach().float()
    bad = (~torch.isfinite(loss32) | ~torch.isfinite(norm)).float()
    loss_sum, n_bad = dist.all_reduce(torch.stack([loss32, bad]), "sum").tolist()
    result = StepResult(loss_sum / p.env.world_size, float(norm), lr, wd, ema, nonfinite=n_bad > 0)
    if signals:
        result.signals = step_signals(features, preds[0], masks[0][1], features.size(1))
    if result.nonfinite:
        p.optimizer.zero_grad(set_to_none=True)
        return result
    p.optimizer.step()
    p.model.ema_update(ema)  # from identical weights on every rank: the target encoders stay identical
    return result


def step_signals(features: torch.Tensor, preds: torch.Tensor, tgt_idx: torch.Tensor, num_tokens: int
                 ) -> Dict[str, float]:
    """The collapse signals (train.signals) of the target features [B, N, D] (every position) and of one mask
    type's predictions [B, Nt, D] (at tgt_idx [B, Nt]), on the first SIGNAL_CLIPS clips."""
    s = min(SIGNAL_CLIPS, features.size(0))
    grid = torch.arange(num_tokens, device=features.device).expand(s, -1)
    out = {f"target_{k}": v for k, v in feature_signals(features[:s], grid, num_tokens).items()}
    out.update({f"pred_{k}": v for k, v in feature_signals(preds[:s], tgt_idx[:s], num_tokens).items()})
    return out


def resolve_amp(amp: str, device: torch.device) -> bool:
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def build(cfg: TrainConfig, env: dist.DistEnv) -> Parts:
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights (checked after resume)
    model = VJEPA.from_config(cfg.model).to(env.device)
    student: nn.Module = Student(model)
    if env.world_size > 1:
        # the only buffers are the fixed pos_embed tables: nothing to sync before each forward
        student = DDP(student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      forward_sync_buffers=False)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.start_lr, betas=tuple(o.betas),
                                  eps=o.eps)
    return Parts(cfg, env, model, student, optimizer, resolve_amp(cfg.amp, env.device))
