"""`make proof`: does tubelet's V-JEPA pretraining learn what a random network does not have?

    python -m research.learning_proof [device=cuda] [budget_s=360] [task=camera] [seeds=[0,1,2]] [out=runs/proof]
                                      [train=[key=value,...]] [probe=[key=value,...]]

Per seed, in one run: pretrain the recipe (configs/train/cpu.yaml + `train` overrides) on a rendered task, train
a frozen attentive probe (configs/probe/cpu.yaml + `probe`) on its target encoder, and, as controls, the same
probe on the same architecture with random weights, and both again with a probe trained `long_probe` times
longer (does pretraining add information, or only make it quicker to read?). The collapse signals of both
encoders' features (train/signals.py) are reported with the scores. Clips are cut from videos rendered without
a codec (research/proof_sweep.py's designs, the product's sampling, clips and masks, the trainer's own step):
the proof needs only torch, so it runs on a GPU host without DALI.

The task: `camera` by default, the sample's five motion classes as whole-frame camera motions, where a random
encoder is weak (33% against 20% chance in BENCHMARKS.md); `discs` (eight pan directions: random features read
them well) and `object` (the built-in sample's design) are the others. Pretraining steps: `steps`, or as many as
fit in half of `budget_s` on this device (timed first).

What it shows: on a GPU, with a budget of minutes, whether pretraining beats random weights on this task under
both probe budgets. What a CPU run shows: that the whole proof runs end to end; at a CPU budget the recipe is
too small for the method to learn this task (BENCHMARKS.md, rounds 1-3), so its numbers say nothing about
V-JEPA. Writes <out>/proof.json and proof.png and prints a table.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence

import numpy as np
import torch

from common.cli import main_for
from common.config import check, load_config
from common.device import resolve_device
from common.files import atomic_write
from pipeline.masks import sample_masks
from research import designs, proof_sweep
from train import dist
from train.config import TrainConfig
from train.plots import plot_proof, try_plot
from train.step import build, train_step

TASKS = ("camera", "discs", "object")


@dataclass
class ProofConfig:
    seeds: List[int] = field(default_factory=lambda: [0])
    out: str = "runs/proof"  # proof.json and the rendered task (cache/)
    device: str = "auto"  # auto | cpu | cuda
    budget_s: float = 360.0  # per seed: pretraining gets half of it (when steps=0), the probes the rest
    task: str = "camera"  # camera | discs | object (see the module docstring)
    steps: int = 0  # pretraining steps; 0 = as many as fit in half of budget_s on this device
    long_probe: int = 4  # the longer-probe control trains the probe this many times longer
    train_per_class: int = 40  # rendered videos per class in the task's train split
    val_per_class: int = 40  # ... and in its val split
    train: List[str] = field(default_factory=list)  # key=value overrides of configs/train/cpu.yaml
    probe: List[str] = field(default_factory=list)  # key=value overrides of configs/probe/cpu.yaml

    def validate(self) -> None:
        check(bool(self.seeds), "seeds", "name at least one seed")
        check(bool(self.out), "out", "name a results folder")
        check(self.task in TASKS, "task", f"must be one of {TASKS}, got {self.task!r}")
        check(self.budget_s > 0 and self.steps >= 0 and self.long_probe >= 1, "budget_s",
              "budget_s > 0, steps >= 0 and long_probe >= 1")
        check(self.train_per_class >= 1 and self.val_per_class >= 1, "train_per_class", "both must be >= 1")


def recipe(cfg: ProofConfig, steps: int) -> List[str]:
    """The pretraining overrides for `steps` steps: the schedules scaled to them (warmup and clipping start at
    a tenth), then the user's."""
    warmup = max(1, steps // 10)
    return [f"schedule.total_steps={steps}", f"optim.warmup_steps={warmup}", f"optim.clip_start={warmup}",
            *cfg.train]


def steps_for_budget(cfg: ProofConfig, device: torch.device, seconds: float) -> int:
    """How many pretraining steps of the recipe fit in `seconds` on `device`: 5 steps timed after 2."""
    tcfg = load_config(TrainConfig, "configs/train/cpu.yaml",
                       [*recipe(cfg, 1000), f"device={device.type}", "amp=off", "metrics.enabled=false"])
    parts = build(tcfg, dist.init(device.type))
    B, m = tcfg.data.batch_size, tcfg.model
    clips = torch.randn(B, 3, m.num_frames, m.img_size, m.img_size, device=device)
    masks = [(torch.from_numpy(c), torch.from_numpy(t))
             for c, t in sample_masks(np.random.default_rng(0), B, m.grid, tcfg.data.masks)]
    batch = SimpleNamespace(clips=clips, masks=masks)
    for step in (1, 2):
        train_step(parts, batch, step)
    t0 = time.perf_counter()
    for step in range(3, 8):
        train_step(parts, batch, step)
    step_s = (time.perf_counter() - t0) / 5
    return int(min(20000, max(20, seconds / step_s)))


def prove(cfg: ProofConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t0 = time.time()
    design = {**designs.BASE_SAMPLE, "motion": cfg.task, "train_per_class": cfg.train_per_class,
              "val_per_class": cfg.val_per_class}
    (out / "cache").mkdir(exist_ok=True)
    data = designs.render_design(design, out / "cache", 4)
    steps = cfg.steps or steps_for_budget(cfg, device, cfg.budget_s / 2)
    per_seed = []
    for seed in cfg.seeds:
        variant = {"train": recipe(cfg, steps), "probe": [*(["data.flip=false"] if cfg.task == "discs" else []),
                                                          *cfg.probe]}
        per_seed.append(proof_sweep.run_job({"name": f"proof-{cfg.task}", "seed": seed, "variant": variant,
                                             "data": str(data), "out": str(out), "device": device.type,
                                             "long_probe": cfg.long_probe}))
    keys = ("pretrained", "random", "pretrained_long", "random_long")
    summary = {"task": cfg.task, "device": device.type, "steps": steps, "long_probe": cfg.long_probe,
               "seconds": round(time.time() - t0, 1), "per_seed": per_seed,
               **{k: statistics.mean(100 * r[k] for r in per_seed) for k in keys}}
    classes = 1 + max(max(labels) for _, labels in torch.load(data, weights_only=True).values())
    summary["chance"] = 100 / classes
    atomic_write(out / "proof.json", json.dumps(summary, indent=2))
    try_plot(plot_proof, per_seed, 1 / classes, cfg.long_probe, out / "proof.png")
    print(f"\nlearning proof on {cfg.task} ({device.type}, {steps} pretraining steps, {len(cfg.seeds)} seed(s), "
          f"{summary['seconds']} s)\n\n| seed | pretrained | random | gap | pretrained, probe x{cfg.long_probe} | "
          f"random, probe x{cfg.long_probe} | gap | target erank / clip share (pretrained) |\n|---|---|---|---|---|---|---|---|")
    for r in per_seed:
        sig = r["pretrained_signals"]
        print(f"| {r['seed']} | {100 * r['pretrained']:.1f} | {100 * r['random']:.1f} | "
              f"{100 * (r['pretrained'] - r['random']):+.1f} | {100 * r['pretrained_long']:.1f} | "
              f"{100 * r['random_long']:.1f} | {100 * (r['pretrained_long'] - r['random_long']):+.1f} | "
              f"{sig['erank']:.2f} / {sig['clip_share']:.2f} |")
    print(f"\ntop-1 in %, chance {summary['chance']:.1f}%; {out / 'proof.json'}, {out / 'proof.png'}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(ProofConfig, prove, argv, prog="python -m research.learning_proof", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
