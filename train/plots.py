"""PNG pictures of a run, for users who look before they read: the loss curve and the probe's result."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def try_plot(plot: Callable[..., Path], *args, **kwargs) -> Optional[Path]:
    """Draw a finished job's picture; a failure (matplotlib missing or broken, a full disk) is a warning, never the
    job's failure: its results are written by then, and a failed run would be restarted (torchrun) only to fail
    the same way again."""
    try:
        return plot(*args, **kwargs)
    except Exception as e:
        png = next((a for a in args if isinstance(a, Path) and a.suffix == ".png"), "")
        log.warning(f"the picture {png} was not drawn ({type(e).__name__}: {e}); the results are complete without it")
        return None


def read_losses(path: Path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(losses_jsonl: Path, out_png: Path, title: str = "", objective: str = "loss") -> Path:
    """The training loss per step (and a 20-step moving average) with the learning rate (`objective` names the
    loss, e.g. "V-JEPA L1 loss"); below it one panel per collapse signal (train.signals) of the target encoder and
    the predictor, with the target encoder's collapse bound (the predictor's signals have none: its outputs are
    smooth within a clip from the start, which is healthy)."""
    from train.signals import COLLAPSE, SIGNALS

    rows = read_losses(losses_jsonl)
    plt = _plt()
    fig = plt.figure(figsize=(8, 7.2))
    grid = fig.add_gridspec(3, 2, height_ratios=[1.3, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    ax.plot(steps, loss, lw=0.8, alpha=0.45, label="loss")
    k = 20
    if len(loss) >= k:
        avg = [sum(loss[i - k:i]) / k for i in range(k, len(loss) + 1)]
        ax.plot(steps[k - 1:], avg, lw=1.6, label=f"{k}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel(objective)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or str(Path(losses_jsonl).parent), fontsize=9)
    labels = {"std": "feature std across clips", "erank": "effective rank (fraction)",
              "clip_share": "clip-mean share of variance", "position_share": "position-mean share of variance"}
    for i, name in enumerate(SIGNALS):
        sub = fig.add_subplot(grid[1 + i // 2, i % 2])
        for source, style in (("target", "-"), ("pred", "--")):
            pts = [(r["step"], r[f"{source}_{name}"]) for r in rows if f"{source}_{name}" in r]
            if pts:
                sub.plot(*zip(*pts), style, lw=1.2, marker=".", ms=3,
                         label="target encoder" if source == "target" else "predictor")
        side, bound = COLLAPSE[name]
        sub.axhline(bound, color="red", lw=0.8, ls=":",
                    label=f"target encoder collapses {side} this (the predictor has no bound)")
        sub.set_title(labels[name], fontsize=8)
        sub.tick_params(labelsize=7)
        if i == 0:
            sub.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_probe(result: Dict, out_png: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in result["history"]], [h["loss"] for h in result["history"]], marker=".")
    ax.set_xlabel("probe epoch")
    ax.set_ylabel("train cross-entropy")
    kind = "random weights" if result["random_init"] else Path(result["checkpoint"]).name
    ax.set_title(f"{kind}: val top-1 {100 * result['top1']:.1f}% (chance {100 * result['chance']:.0f}%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_proof(per_seed: Sequence[Dict], chance: float, long_probe: int, out_png: Path) -> Path:
    """Val top-1 of the pretrained vs random-weight encoders per seed, with the probe as configured and trained
    `long_probe` times longer, and chance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = range(len(per_seed))
    bars = (("pretrained", "V-JEPA pretrained"), ("random", "random weights"),
            ("pretrained_long", f"pretrained, probe x{long_probe}"), ("random_long", f"random, probe x{long_probe}"))
    for i, (key, label) in enumerate(bars):
        ax.bar([x - 0.3 + 0.2 * i for x in xs], [100 * r[key] for r in per_seed], 0.2, label=label)
    ax.axhline(100 * chance, color="k", ls=":", lw=1, label="chance")
    ax.set_xticks(list(xs), [f"seed {r['seed']}" for r in per_seed])
    ax.set_ylabel("frozen-probe val top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
