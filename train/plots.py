"""PNG pictures of a run, for users who look before they read: the loss curve and the probe's result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_losses(path: Path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(losses_jsonl: Path, out_png: Path, title: str = "") -> Path:
    """The training loss per step (and a 20-step moving average) with the learning rate."""
    rows = read_losses(losses_jsonl)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    ax.plot(steps, loss, lw=0.8, alpha=0.45, label="loss")
    k = 20
    if len(loss) >= k:
        avg = [sum(loss[i - k:i]) / k for i in range(k, len(loss) + 1)]
        ax.plot(steps[k - 1:], avg, lw=1.6, label=f"{k}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("V-JEPA L1 loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or str(Path(losses_jsonl).parent), fontsize=9)
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


def plot_proof(per_seed: Sequence[Dict], out_png: Path) -> Path:
    """Val top-1 of the pretrained vs random-weight encoders, per seed, with chance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(per_seed))
    ax.bar([x - 0.2 for x in xs], [100 * r["pretrained_top1"] for r in per_seed], 0.4, label="V-JEPA pretrained")
    ax.bar([x + 0.2 for x in xs], [100 * r["random_top1"] for r in per_seed], 0.4, label="random weights")
    ax.axhline(100 * per_seed[0]["chance"], color="k", ls=":", lw=1, label="chance")
    ax.set_xticks(list(xs), [f"seed {r['seed']}" for r in per_seed])
    ax.set_ylabel("frozen-probe val top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
