"""Collapse and feature-quality signals, computed live: is the run learning, or are its features collapsing?

Every `log_every` steps the trainer hands the target encoder's features (the full token grid) and the
predictor's outputs (at their target positions) of a few clips of the batch to `feature_signals`. Features are
layer-normed per token first (as the targets of the loss are), so the numbers mean the same in every run:

    std             mean over dimensions of the std across clips at the same token position: 0 when every clip
                    gives the same features (complete collapse)
    erank           effective rank (exp of the entropy of the normalised singular values of the centred tokens,
                    128 of them evenly spaced), as a fraction of its maximum min(128, width): near 0 when the
                    features span a few directions
    clip_share      share of the feature variance that is each clip's mean token: near 1 when the tokens of a clip
                    are all alike (the features say which clip, not what is where)
    position_share  share of the variance that is each position's mean token: near 1 when the features are a
                    function of the position only (the same for every clip)

A run is flagged as collapsing when a signal of the target encoder (the representation a run produces) crosses
its bound in `COLLAPSE`: the same bounds as the TubeletRepresentationCollapse alert in
configs/monitoring/rules/alerts.yml (a test keeps them equal). The predictor's signals are for diagnosis: its
outputs are smooth within a clip from the first steps (clip_share near 1), which is not a collapse.

Seen on the built-in sample (dev-cpu, BENCHMARKS.md): healthy runs keep std 0.38-0.94, erank 0.28-0.52,
clip_share 0.23-0.81 and position_share 0.06-0.42 over their first 150 steps; a run forced to collapse (EMA
momentum 0, learning rate 3e-2) has erank 0.014-0.03 from step 5 and std 0.004-0.064, while its loss falls
faster than the healthy run's.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SIGNAL_CLIPS = 4  # clips of the batch the signals are computed on
ERANK_TOKENS = 128  # tokens of those clips the effective rank is computed on
SIGNALS = ("std", "erank", "clip_share", "position_share")
# signal -> ("below" | "above", bound): crossing it means collapse
COLLAPSE: Dict[str, tuple] = {"std": ("below", 0.05), "erank": ("below", 0.05), "clip_share": ("above", 0.9),
                              "position_share": ("above", 0.9)}


@torch.no_grad()
def feature_signals(x: torch.Tensor, pos: torch.Tensor, num_positions: int) -> Dict[str, float]:
    """x [S, N, D] features of S clips, pos [S, N] int64 their token positions (t-major index) -> the signals."""
    S, N, D = x.shape
    f = F.layer_norm(x.detach().float(), (D,)).reshape(S * N, D)
    p = pos.reshape(S * N).to(f.device)
    mean = f.mean(0)
    centred = f - mean
    total = centred.pow(2).mean(0).sum().clamp_min(1e-12)  # the variance, summed over dimensions
    clip_share = (f.reshape(S, N, D).mean(1) - mean).pow(2).mean(0).sum() / total
    count = torch.bincount(p, minlength=num_positions).to(f.dtype)  # clips seen at each position
    sums = torch.zeros(num_positions, D, device=f.device).index_add_(0, p, f)
    squares = torch.zeros(num_positions, D, device=f.device).index_add_(0, p, f * f)
    seen = count > 0
    pos_mean = sums[seen] / count[seen, None]
    position_share = (count[seen, None] * (pos_mean - mean).pow(2)).sum() / (S * N) / total
    shared = count > 1  # the std across clips needs a position that at least two clips have
    n = count[shared, None]
    var = ((squares[shared] - sums[shared].pow(2) / n) / (n - 1)).clamp_min(0)  # unbiased: few clips
    std = var.sqrt().mean() if shared.any() else torch.zeros((), device=f.device)
    # singular values of (an evenly spaced sample of ERANK_TOKENS of) the centred tokens, from the eigenvalues of
    # the smaller Gram matrix: the spectrum is the one costly part, this keeps it at a 128 x 128 eigenproblem
    sample = centred[torch.linspace(0, S * N - 1, min(S * N, ERANK_TOKENS), device=f.device).long()]
    gram = sample.T @ sample if D <= len(sample) else sample @ sample.T
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    q = sv / sv.sum().clamp_min(1e-12)
    erank = torch.exp(-(q * torch.log(q.clamp_min(1e-12))).sum()) / min(len(sample), D)
    out = torch.stack([std, erank, clip_share, position_share]).tolist()  # the one host sync, on logged steps
    return dict(zip(SIGNALS, out))


def collapse_reasons(signals: Dict[str, float], prefix: str = "") -> List[str]:
    """The signals past their collapse bounds, as readable phrases (empty: no sign of collapse)."""
    out = []
    for name, (side, bound) in COLLAPSE.items():
        value = signals.get(prefix + name)
        if value is not None and (value < bound if side == "below" else value > bound):
            out.append(f"{prefix}{name} {value:.3f} {'<' if side == 'below' else '>'} {bound}")
    return out


class CollapseWatch:
    """Says so in the log when a run's signals cross their collapse bounds (and when they come back)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.collapsed = enabled, False

    def update(self, step: int, signals: Dict[str, float]) -> List[str]:
        reasons = collapse_reasons(signals, "target_")
        if self.enabled and bool(reasons) != self.collapsed:
            if reasons:
                log.warning(f"step {step}: the representation looks collapsed ({', '.join(reasons)}); see the "
                            "signal panels of loss.png and the dashboard")
            else:
                log.info(f"step {step}: the collapse signals are back within their bounds")
        self.collapsed = bool(reasons)
        return reasons

