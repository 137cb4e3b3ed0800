"""`make proof`: does tubelet's V-JEPA pretraining learn? Pretrain on the built-in sample, probe, compare.

    python -m research.learning_proof [seeds=[0,1,2]] [out=runs/proof] [train=[key=value,...]] [probe=[...]]

For each seed: pretrain the CPU default (configs/train/cpu.yaml) on data/shards/sample, train a frozen attentive
probe on its target encoder (configs/probe/cpu.yaml), and train the same probe on the same architecture
with random weights. The sample's labels are kinds of motion, so a single frame carries no label: features
must encode motion to score above chance. Writes <out>/proof.json and proof.png, and per seed the run
folder with loss.png and the probe JSON/PNG files.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from common.cli import main_for
from common.config import check, load_config
from train import checkpoint
from train.config import TrainConfig
from train.plots import plot_proof
from train.probe import ProbeConfig
from train.probe import run as run_probe
from train.trainer import run as run_train


def one_seed(seed: int, out: Path, train_overrides, probe_overrides) -> dict:
    run_dir = out / f"seed{seed}"
    cfg = load_config(TrainConfig, "configs/train/cpu.yaml",
                      [f"run_dir={run_dir}", f"seed={seed}", f"data.seed={seed}", *train_overrides])
    t0 = time.time()
    run_train(cfg)
    t_train = time.time() - t0
    step, ckpt = checkpoint.list_checkpoints(run_dir / cfg.checkpoint.dir)[0]
    results = {}
    for random_init in (False, True):
        pcfg = load_config(ProbeConfig, "configs/probe/cpu.yaml",
                           [f"checkpoint={ckpt}", f"random_init={str(random_init).lower()}", f"seed={seed}",
                            *probe_overrides])
        results[random_init] = run_probe(pcfg)
    return {"seed": seed, "steps": step, "train_seconds": round(t_train, 1),
            "pretrained_top1": results[False]["top1"], "random_top1": results[True]["top1"],
            "chance": results[False]["chance"], "seconds": round(time.time() - t0, 1), "run_dir": str(run_dir)}


@dataclass
class ProofConfig:
    seeds: List[int] = field(default_factory=lambda: [0])
    out: str = "runs/proof"  # proof.json, proof.png and a run folder per seed
    train: List[str] = field(default_factory=list)  # key=value overrides of configs/train/cpu.yaml
    probe: List[str] = field(default_factory=list)  # key=value overrides of configs/probe/cpu.yaml

    def validate(self) -> None:
        check(bool(self.seeds), "seeds", "name at least one seed")
        check(bool(self.out), "out", "name a results folder")


def prove(cfg: ProofConfig) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [one_seed(s, out, cfg.train, cfg.probe) for s in cfg.seeds]
    gaps = [r["pretrained_top1"] - r["random_top1"] for r in per_seed]

    def stat(key):
        vals = [100 * r[key] for r in per_seed]
        return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}

    summary = {"per_seed": per_seed, "pretrained_top1": stat("pretrained_top1"), "random_top1": stat("random_top1"),
               "gap_points": {"mean": 100 * statistics.mean(gaps),
                              "std": 100 * statistics.stdev(gaps) if len(gaps) > 1 else 0.0},
               "chance": 100 * per_seed[0]["chance"]}
    (out / "proof.json").write_text(json.dumps(summary, indent=2))
    plot_proof(per_seed, out / "proof.png")
    print("\n| seed | pretrained top-1 | random-weights top-1 | gap (points) | wall s |\n|---|---|---|---|---|")
    for r, g in zip(per_seed, gaps):
        print(f"| {r['seed']} | {100 * r['pretrained_top1']:.1f} | {100 * r['random_top1']:.1f} | {100 * g:+.1f} | {r['seconds']} |")
    p, rnd, gp = summary["pretrained_top1"], summary["random_top1"], summary["gap_points"]
    print(f"| mean ± std | {p['mean']:.1f} ± {p['std']:.1f} | {rnd['mean']:.1f} ± {rnd['std']:.1f} | "
          f"{gp['mean']:+.1f} ± {gp['std']:.1f} | |\nchance {summary['chance']:.1f}%; {out / 'proof.json'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(ProofConfig, prove, argv, prog="python -m research.learning_proof", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
