"""The training step and what it needs: `build` makes the networks and the optimizer once, `train_step` makes one
optimizer update. Research harnesses and benchmarks call these same two functions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from torch.nn.parallel import DistributedDataParallel as DDP

from model.vjepa import VJEPA, jepa_loss
from pipeline.clips import Batch, masks_to
from train import dist, schedules
from train.config import DDPConfig, OptimConfig, TrainConfig
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
    student: nn.Module  # Student, DDP-wrapped when world_size > 1, compiled with compile=true
    target_features: Callable[[torch.Tensor], torch.Tensor]  # model.target_features, compiled with compile=true
    optimizer: torch.optim.Optimizer
    amp: bool  # bf16 autocast
    fused: bool  # fused AdamW, which honours a found-inf flag on the device (else foreach, and a host sync per step)
    # nonfinite=stop: 1 on the device from the first non-finite step on; every later update is skipped, so the
    # weights stay as before that step until the host reads the flag (every log_every steps) and stops
    halted: torch.Tensor

    def named_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every parameter of the three networks, named: what must be identical on every rank."""
        for part in ("encoder", "predictor", "target_encoder"):
            for name, t in getattr(self.model, part).named_parameters():
                yield f"{part}.{name}", t


@dataclass
class StepResult:
    """One step's outcome. The loss, norm and skip flag stay on the device (`stats`) until they are read: reading
    them (the properties, or `read_stats` for many steps at once) waits for the device to finish the step."""

    stats: torch.Tensor  # [3] float32: loss (mean over ranks), grad norm (before clipping), 1 = update skipped
    lr: float
    weight_decay: float
    ema: float
    signals: Optional[Dict[str, float]] = None  # collapse signals (train.signals), "target_*" and "pred_*"

    @property
    def loss(self) -> float:
        return float(self.stats[0])

    @property
    def grad_norm(self) -> float:
        return float(self.stats[1])

    @property
    def nonfinite(self) -> bool:
        """The loss or a gradient was non-finite on some rank at this step, and its update was skipped."""
        return bool(self.stats[2] > 0)


@dataclass
class StepStats:
    step: int
    step_seconds: float  # wall time of the whole step, data wait included
    data_wait_seconds: float  # time blocked waiting for the batch
    clips: int  # clips processed by this rank in the step
    loss: float
    lr: float
    weight_decay: float
    ema_momentum: float
    grad_norm: float
    skipped: bool = False  # a non-finite step skipped by the NaN guard


def read_stats(results: Sequence[StepResult]) -> List[Tuple[float, float, bool]]:
    """(loss, grad norm, nonfinite) of each step, read from the device in one transfer (one host sync)."""
    if not results:
        return []
    rows = torch.stack([r.stats for r in results]).tolist()
    return [(loss, norm, bad > 0) for loss, norm, bad in rows]


def grad_norm_(params: List[nn.Parameter], clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients; scaled down to `clip` when clip > 0 and the norm exceeds it."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def train_step(p: Parts, batch: Batch, step: int, force_nan: bool = False, signals: bool = False) -> StepResult:
    """One optimizer update (step counted from 1), queued on the device without waiting for it (no host sync,
    except for the collapse signals with `signals` and on the foreach-AdamW fallback). When the loss or a gradient
    is non-finite on any rank, nothing is applied: the optimizer skips through its found-inf flag and the EMA
    weight becomes 0, decided on the device; with nonfinite=stop every later step is skipped too (`Parts.halted`).
    The caller reads the outcome later and decides to stop or go on. With `signals`, also the collapse signals of
    this step's target features and predictions, on the batch's first few clips."""
    o, horizon = p.cfg.optim, p.cfg.schedule.horizon
    if o.lr_schedule == "wsd":
        lr = schedules.wsd_lr(step, peak=o.lr, start=o.start_lr, final=o.final_lr, warmup=o.warmup_steps,
                              decay=o.decay_steps, total=p.cfg.schedule.total_steps)
    else:
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
    masks = masks_to(batch.masks, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.amp):
        features = p.target_features(clips)  # [B, N, D], no grad
        targets = p.model.gather_targets(features, masks)  # [B, Nt, D] per mask type
        preds = p.student(clips, masks)  # [B, Nt, D] per mask type; DDP all-reduces grads in backward
        loss = jepa_loss(preds, targets, p.model.loss)
    if force_nan:
        loss = loss * float("nan")
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()

    clip = o.clip_grad if step > o.clip_start else 0.0  # the reference clips only after its warm-up epochs
    norm = torch.hypot(grad_norm_(list(p.model.encoder.parameters()), clip),
                       grad_norm_(list(p.model.predictor.parameters()), clip))
    # Every rank must agree on the guard before the weights change: gradients are identical on all ranks after
    # DDP, and the flag is summed across ranks (with the losses, for the log), on the device.
    loss32 = loss.detach().float()
    bad = (~torch.isfinite(loss32) | ~torch.isfinite(norm)).float()
    loss_sum, n_bad = dist.all_reduce(torch.stack([loss32, bad]), "sum").unbind()
    bad = (n_bad > 0).float()
    skip = bad
    if p.cfg.nonfinite == "stop":
        skip = torch.maximum(bad, p.halted)
        p.halted.copy_(skip)
    result = StepResult(torch.stack([loss_sum / p.env.world_size, norm.float(), bad]), lr, wd, ema)
    if signals:
        result.signals = step_signals(features, preds[0], masks[0][1], features.size(1))
    if p.fused:
        p.optimizer.found_inf = skip  # the fused kernels leave weights, moments and step counts as they are
        p.optimizer.step()
    elif not skip.item():  # foreach AdamW cannot skip on the device: one host sync
        p.optimizer.step()
    p.model.ema_update(ema, skip=skip)  # from identical weights on every rank: the target encoders stay identical
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


def make_optimizer(model: VJEPA, o: OptimConfig) -> Tuple[torch.optim.Optimizer, bool]:
    """AdamW over the model's parameter groups: fused (one kernel over all tensors) where the device has it, else
    foreach. Returns (optimizer, fused)."""
    kw = dict(lr=o.start_lr, betas=tuple(o.betas), eps=o.eps)
    try:
        return torch.optim.AdamW(model.param_groups(o.weight_decay), fused=True, **kw), True
    except RuntimeError:  # "fused=True requires ... supported devices"
        return torch.optim.AdamW(model.param_groups(o.weight_decay), foreach=True, **kw), False


def attention_backend(cfg: TrainConfig, device: torch.device, amp: bool) -> str:
    """The scaled-dot-product-attention kernel torch picks for the encoder's attention (flash, efficient, cudnn or
    math), asked of its dispatcher with the encoder's head size and the step's dtype."""
    width, _, heads = cfg.model.encoder_shape
    dtype = torch.bfloat16 if amp else torch.float32
    q = torch.zeros(1, heads, 16, width // heads, device=device, dtype=dtype)
    try:
        return SDPBackend(torch._fused_sdp_choice(q, q, q)).name.lower()
    except Exception:  # a private dispatcher query: say so rather than fail the run
        return "unknown"


def ddp_kwargs(d: DDPConfig, accepted: Optional[Iterable[str]] = None) -> Dict:
    """DistributedDataParallel's settings for this model, in the keywords the installed torch takes (`accepted`:
    the names its constructor takes; read from it by default). The model's only buffers are fixed position tables,
    so buffers are never synchronised before a forward: `forward_sync_buffers=False` from torch 2.13 on (where
    `broadcast_buffers` is deprecated), `broadcast_buffers=False` before."""
    accepted = set(inspect.signature(DDP.__init__).parameters if accepted is None else accepted)
    kw = dict(bucket_cap_mb=d.bucket_cap_mb, gradient_as_bucket_view=d.gradient_as_bucket_view,
              static_graph=d.static_graph)
    kw["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = False
    return kw


def build(cfg: TrainConfig, env: dist.DistEnv) -> Parts:
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights (checked after resume)
    model = VJEPA.from_config(cfg.model).to(env.device)
    student: nn.Module = Student(model)
    if env.world_size > 1:
        student = DDP(student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      **ddp_kwargs(cfg.ddp))
    target_features = model.target_features
    if cfg.compile:
        # the context and target token counts change from batch to batch: one graph with symbolic sizes; the
        # target encoder always sees every token
        student = torch.compile(student, dynamic=True)
        target_features = torch.compile(model.target_features, dynamic=False)
    optimizer, fused = make_optimizer(model, cfg.optim)
    return Parts(cfg, env, model, student, target_features, optimizer, resolve_amp(cfg.amp, env.device), fused,
                 halted=torch.zeros((), device=env.device))
