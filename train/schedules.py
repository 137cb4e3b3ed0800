"""Schedules as small pure functions of the step (facebookresearch/jepa, src/utils/schedulers.py).

Every schedule spans a horizon of `horizon_scale x total_steps` steps (the reference's `ipe_scale`, 1.25), so a
run that stops at total_steps ends part-way down the cosine: LR ~7.5e-5, weight decay ~0.37, EMA ~0.9996 on
the ViT-L recipe. The warmup is not scaled. Nothing here holds state: resuming at step k needs only k.

Indexing as in the reference: the LR and weight decay of step k (1-based) are `lr(k)`, `weight_decay(k)` (its
schedulers advance before they are read); the EMA momentum applied after step k is `ema_momentum(k - 1)`.
"""

from __future__ import annotations

import math


def lr(step: int, *, peak: float, start: float, final: float, warmup: int, horizon: float) -> float:
    """Linear warmup start -> peak over `warmup` steps, then cosine peak -> final at `horizon`."""
    if step < warmup:
        return start + (step / warmup) * (peak - start)
    progress = (step - warmup) / max(1.0, horizon - warmup)
    return max(final, final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def wsd_lr(step: int, *, peak: float, start: float, final: float, warmup: int, decay: int, total: int) -> float:
    """Warmup-stable-decay (V-JEPA 2's `WSDSchedule`, src/utils/schedulers.py): linear start -> peak over `warmup`
    steps, constant `peak`, then linear peak -> final over the last `decay` of `total` steps. For continued
    pretraining from released weights: a fresh optimizer warms up, and the decay is the cooldown that ends the run."""
    if step < warmup:
        return start + (step / max(1, warmup)) * (peak - start)
    decay_from = total - decay
    if step < decay_from:
        return peak
    return peak + min(1.0, (step - decay_from) / max(1, decay)) * (final - peak)


def weight_decay(step: int, *, start: float, final: float, horizon: float) -> float:
    """Cosine start -> final over the horizon (rising in the V-JEPA recipe, 0.04 -> 0.4)."""
    progress = min(step / horizon, 1.0)
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, *, start: float, end: float, horizon: float) -> float:
    """Linear start -> end over the horizon (0.998 -> 1.0)."""
    return start + (end - start) * min(step / horizon, 1.0)
