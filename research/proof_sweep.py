"""Recipe search for the learning proof (`make proof`), fast, on a GPU host.

    python -m research.proof_sweep out=DIR [variants=[a,b]] [seeds=[0,1,2]] [workers=12] [budget=420]

The learning proof must run on 2 CPU cores in minutes, so its recipe (model shape, steps, EMA, sample design,
probe) cannot be searched there. This runs the same proof for many recipes at once: the built-in sample's
videos are rendered by `shards.synthetic` (the same scenes, plan and labels, at a reduced resolution, without
the codec); the order, clip records (window, random resized crop, flip; evaluation views) and masks are
`pipeline.sampling.Plan`'s, clips are cut by `pipeline.clips.cut_clip` on the device, every update is
`train.step.train_step` with the trainer's own config tree, and the frozen-probe epochs and scores are
`train.probe`'s. What differs from `make proof`: no codec artefacts, and clips come from tensors instead of the
DALI loader.

For every (variant, seed) it pretrains, then probes the target encoder and a randomly initialised encoder of
the same shape (seeded like `train.probe`'s `random_init`). Results stream to DIR/sweep.jsonl (one line per
job, written as each finishes) and DIR/sweep.md (mean and spread per variant). Jobs are ordered seed-major so
a run cut short by `budget` still covers every variant.

A variant is {"sample": {...}, "train": [key=value ...], "probe": [key=value ...]}, optionally with
"control": "frame_difference" (no pretraining: the probe reads raw tubelet frame differences), "label":
"brightness" (first-frame brightness quintiles instead of the motion classes: a label one frame carries),
"supervised": true (the encoder and an attentive head trained end to end on the labels for the same steps and
clips: an upper bound on what the shape can read from the data at that budget) or "data": a .pt file of
{split: (list of uint8 [F, H, W, 3] videos, labels)} instead of the rendered sample. Sample keys: motion
("object": the sample; "camera": the same five classes as whole-frame camera motions over textures with one
shared palette, 96x96; "discs": eight pan directions, 45 degrees apart, over a periodic field of bright discs
on a dark background, 96x96, 40 frames at 1-1.5 px per frame; its classes are not flip-invariant, so probe it
with data.flip=false), size_range (object size as a fraction of the short side), bg_contrast (background noise
amplitude), train_per_class, val_per_class. Variants are listed in VARIANTS below; `variants` picks some,
`extra` adds JSON ones. Every job also reports how alike a clip's tokens are (the share of feature variance
that is the per-clip mean).

The designs and their clips are `research.designs`, the frame-difference control `research.controls`, the job
processes `research.scheduler`; this file is the variants, one job (pretrain, probe, controls) and the summary.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import main_for
from common.config import check, load_config
from common.device import resolve_device
from research.controls import FrameDifferenceTokens
from research.designs import BASE_SAMPLE, batch_clips, render_design, sweep_plan
from research.scheduler import schedule

_P8 = ["model.patch_size=8", "model.width=96", "model.depth=6", "model.heads=3", "model.predictor_width=96",
       "model.predictor_heads=3"]
_BIG = {"size_range": (0.15, 0.3)}
_SMALL = ["model.width=96", "model.depth=4", "model.heads=3", "model.predictor_width=96", "model.predictor_depth=2",
          "model.predictor_heads=3"]
_DISCS = {"motion": "discs", "train_per_class": 25, "val_per_class": 25}
VARIANTS: Dict[str, dict] = {
    # the committed recipe (configs/train/cpu.yaml, configs/probe/cpu.yaml), then one change at a time
    "base": {},
    "steps600": {"train": ["schedule.total_steps=600"]},
    "steps1000": {"train": ["schedule.total_steps=1000"]},
    "ema99": {"train": ["optim.ema_start=0.99", "optim.ema_end=0.999"]},
    "ema996": {"train": ["optim.ema_start=0.996"]},
    "lr2e-3": {"train": ["optim.lr=2e-3"]},
    "lr5e-4": {"train": ["optim.lr=5e-4"]},
    "stride5": {"train": ["data.frame_stride=5"]},
    "crop06": {"train": ["data.crop_scale=[0.6,1.0]"]},
    "big_objects": {"sample": _BIG},
    "train100": {"sample": {"train_per_class": 100}},
    "p8w96d6": {"train": _P8},
    "p8w128d6": {"train": ["model.patch_size=8", "model.width=128", "model.depth=6", "model.heads=4",
                           "model.predictor_width=128", "model.predictor_heads=4"]},
    "d6": {"train": ["model.depth=6"]},
    "img96": {"train": ["model.img_size=96", "data.crop_size=96"]},
    "probe_lr3e-3": {"probe": ["lr=3e-3"]},
    "probe_ep60": {"probe": ["epochs=60"]},
    # combinations that fit the CPU budget (~300 s of pretraining per seed on 2 cores)
    "big_steps600": {"sample": _BIG, "train": ["schedule.total_steps=600"]},
    "big_ema99_steps600": {"sample": _BIG, "train": ["schedule.total_steps=600", "optim.ema_start=0.99",
                                                     "optim.ema_end=0.999"]},
    "p8w96d6_steps450": {"train": [*_P8, "schedule.total_steps=450"]},
    "big_p8w96d6_steps450": {"sample": _BIG, "train": [*_P8, "schedule.total_steps=450"]},
    # brackets: much more compute, the easiest data, and a supervised upper bound (encoder + probe trained
    # end to end on the labels for the same steps: can this shape read the motion at all?)
    "steps3000": {"train": ["schedule.total_steps=3000"]},
    "easy_steps1000": {"sample": {"size_range": (0.2, 0.35)},
                       "train": ["schedule.total_steps=1000", "data.frame_stride=5", "data.crop_scale=[0.6,1.0]"]},
    "supervised": {"supervised": True},
    "supervised_p8w96d6": {"supervised": True, "train": _P8},
    # controls: what the probe reads from local motion alone (no network), and from an appearance label
    "control_frame_difference": {"control": "frame_difference"},
    "camera_frame_difference": {"control": "frame_difference", "sample": {"motion": "camera"}},
    "control_brightness": {"control": "frame_difference", "label": "brightness"},
    "camera_steps300": {"sample": {"motion": "camera"}},
    "big_train100_steps600": {"sample": {**_BIG, "train_per_class": 100}, "train": ["schedule.total_steps=600"]},
    # round 3: a design whose labels random features can read (pans of a disc field), a fast encoder, and the
    # same probe trained longer (does pretraining add information, or only make it quicker to read?)
    "discs_small300": {"sample": _DISCS, "train": [*_SMALL, "schedule.total_steps=300"], "probe": ["data.flip=false"]},
    "discs_small300_probe60": {"sample": _DISCS, "train": [*_SMALL, "schedule.total_steps=300"],
                               "probe": ["data.flip=false", "epochs=60", "lr=3e-3"]},
    "discs_small1000": {"sample": _DISCS, "train": [*_SMALL, "schedule.total_steps=1000"],
                        "probe": ["data.flip=false"]},
    "discs_frame_difference": {"sample": _DISCS, "control": "frame_difference", "probe": ["data.flip=false"]},
}


# ---------------------------------------------------------------------------------------------- one job


def eval_signals(tokens: torch.Tensor) -> Dict[str, float]:
    """The product's collapse signals (train.signals) of evaluation features [n, N, D] (every position)."""
    from train.signals import feature_signals

    n, N, _ = tokens.shape
    return feature_signals(tokens, torch.arange(N, device=tokens.device).expand(n, -1), N)


def _features(encoder, clips: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder(clips[i:i + batch]).half() for i in range(0, len(clips), batch)])


def probe_score(encoder, data, tcfg, pcfg, device, head=None) -> tuple:
    """train.probe's recipe on clips cut here: cached training passes (epoch p of the probe's sampling), then
    evaluation views summed per video. With `head` (a trained AttentiveProbe), only score it on the evaluation
    views. Returns (top-1, the collapse signals of the evaluation features)."""
    from model.probe import AttentiveProbe
    from train.probe import train_epoch, video_scores

    T, S, stride = tcfg.model.num_frames, tcfg.model.img_size, tcfg.data.frame_stride
    (tv, tl), (vv, vl) = data["train"], data["val"]
    d = replace(pcfg.data, frame_stride=stride)
    passes = []
    plan = sweep_plan(tv, d, True, pcfg.seed, len(tv), T)  # one step = one pass over every training video
    for p in range(0 if head is not None else pcfg.cached_passes):
        plan.load_state_dict({**plan.state_dict(), "epoch": p, "position": 0})
        bp = next(plan)
        passes.append({"tokens": _features(encoder, batch_clips(tv, bp, T, stride, S), 64),
                       "labels": torch.tensor([tl[r] for r in bp.rows])})
    views = next(sweep_plan(vv, d, False, pcfg.seed, len(vv) * d.eval_clips * d.eval_crops, T))
    val = {"tokens": _features(encoder, batch_clips(vv, views, T, stride, S), 64), "rows": torch.tensor(views.rows)}
    classes = max(tl) + 1
    probe = head
    if probe is None:
        heads = pcfg.heads or getattr(encoder, "num_heads", 0) or encoder.blocks[0].attn.num_heads
        probe = AttentiveProbe(encoder.embed_dim, classes, heads, variant=pcfg.variant).to(device)
        opt = torch.optim.AdamW(probe.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
        for epoch in range(pcfg.epochs):
            train_epoch(probe, opt, passes[epoch % len(passes)], pcfg, epoch, 0, device)
    logits = video_scores(probe, val, len(vv), classes, pcfg.batch_size, device)
    return (logits.argmax(-1).cpu() == torch.tensor(vl)).float().mean().item(), eval_signals(val["tokens"])


def run_job(job: dict) -> dict:
    from model.probe import AttentiveProbe
    from model.vit import VisionTransformer
    from train import dist
    from train.config import TrainConfig
    from train.probe import ProbeConfig
    from train.step import build, train_step

    t0 = time.time()
    device = resolve_device(job.get("device", "auto"))
    if device.type == "cuda":
        torch.set_num_threads(1)  # many jobs share the host's cores; the work is on the device
    seed, var = job["seed"], job["variant"]
    data = torch.load(job["data"], weights_only=True)
    data = {s: ([v.to(device) for v in vids], labels) for s, (vids, labels) in data.items()}
    if var.get("label") == "brightness":  # a control label that one frame carries: first-frame brightness quintile
        for split, (vids, _) in data.items():
            m = torch.tensor([v[0].float().mean().item() for v in vids])
            data[split] = (vids, torch.bucketize(m, torch.quantile(m, torch.tensor([0.2, 0.4, 0.6, 0.8]))).tolist())
    control = var.get("control") == "frame_difference"  # no pretraining: probe raw tubelet differences
    cfg = load_config(TrainConfig, "configs/train/cpu.yaml",
                      [*var.get("train", []), f"seed={seed}", f"data.seed={seed}", f"device={device.type}",
                       "amp=off", "metrics.enabled=false", f"run_dir={job['out']}/runs/{job['name']}-s{seed}"])
    env = dist.init(device.type)
    parts = build(cfg, env)
    T, S, stride, B = cfg.model.num_frames, cfg.model.img_size, cfg.data.frame_stride, cfg.data.batch_size
    d = cfg.data
    vids, labels = data["train"]
    pcfg = load_config(ProbeConfig, "configs/probe/cpu.yaml",
                       ["checkpoint=sweep", f"seed={seed}", *var.get("probe", [])])
    if var.get("supervised"):
        torch.manual_seed(seed)
        sup = torch.nn.Sequential(VisionTransformer.from_config(cfg.model), AttentiveProbe(
            cfg.model.encoder_width, max(labels) + 1, cfg.model.encoder_shape[2])).to(device)
        sup_opt = torch.optim.AdamW(sup.parameters(), lr=cfg.optim.lr, weight_decay=0.05)
        labels_t = torch.tensor(labels, device=device)
    plan = sweep_plan(vids, d, True, seed, B, T)
    losses = []
    steps = 0 if control else cfg.schedule.total_steps
    for step in range(1, steps + 1):
        bp = next(plan)
        clips = batch_clips(vids, bp, T, stride, S)
        if var.get("supervised"):
            for group in sup_opt.param_groups:
                group["lr"] = cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.schedule.total_steps))
            loss = F.cross_entropy(sup(clips), labels_t[torch.as_tensor(bp.rows, device=device)])
            sup_opt.zero_grad(set_to_none=True)
            loss.backward()
            sup_opt.step()
            losses.append(loss.item())
            continue
        masks = plan.masks(bp, cfg.model.grid, d.masks)
        batch = SimpleNamespace(clips=clips, masks=[(torch.from_numpy(c), torch.from_numpy(t)) for c, t in masks])
        losses.append(train_step(parts, batch, step).loss)
    t_train = time.time() - t0
    torch.manual_seed(seed)  # as train.probe's random_init
    random_enc = VisionTransformer.from_config(cfg.model).to(device).eval()
    result = {"name": job["name"], "seed": seed, "steps": steps,
              "loss_first": float(np.mean(losses[:10])) if losses else float("nan"),
              "loss_last": float(np.mean(losses[-20:])) if losses else float("nan"), "train_s": round(t_train, 1)}
    if var.get("supervised"):  # the end-to-end model scored on the same evaluation views
        scored = probe_score(sup[0].eval(), data, cfg, pcfg, device, head=sup[1])
    elif control:
        scored = probe_score(FrameDifferenceTokens(), data, cfg, pcfg, device)
    else:
        scored = probe_score(parts.model.target_encoder.eval(), data, cfg, pcfg, device)
    result["pretrained"], result["pretrained_signals"] = scored
    result["random"], result["random_signals"] = probe_score(random_enc, data, cfg, pcfg, device)
    if job.get("long_probe") and not var.get("supervised"):  # the same probe trained k times longer
        longer = replace(pcfg, epochs=pcfg.epochs * job["long_probe"])
        encoder = FrameDifferenceTokens() if control else parts.model.target_encoder.eval()
        result["pretrained_long"] = probe_score(encoder, data, cfg, longer, device)[0]
        result["random_long"] = probe_score(random_enc, data, cfg, longer, device)[0]
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------- sweep


def summarise(rows: Sequence[dict]) -> str:
    by: Dict[str, List[dict]] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["name"], []).append(r)

    def ms(vals):
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.1f}"

    lines = ["| variant | seeds | pretrained top-1 | random top-1 | gap (points) | loss first -> last | train s "
             "| clip-mean share pretrained / random |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(by.items(), key=lambda kv: -statistics.mean(r["pretrained"] - r["random"] for r in kv[1])):
        def mean(key):
            return statistics.mean(r[key] for r in rs)

        lines.append(f"| {name} | {len(rs)} | {ms([100 * r['pretrained'] for r in rs])} | "
                     f"{ms([100 * r['random'] for r in rs])} | "
                     f"{ms([100 * (r['pretrained'] - r['random']) for r in rs])} | "
                     f"{mean('loss_first'):.3f} -> {mean('loss_last'):.3f} | {mean('train_s'):.0f} | "
                     f"{statistics.mean(r['pretrained_signals']['clip_share'] for r in rs):.2f} / "
                     f"{statistics.mean(r['random_signals']['clip_share'] for r in rs):.2f} |")
    errors = [f"- {r['name']} seed {r['seed']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


@dataclass
class SweepConfig:
    out: str = ""  # results folder: sweep.jsonl, sweep.md, runs/
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))  # names from VARIANTS; [] = only `extra`
    extra: str = ""  # JSON {name: variant} (or a .json file of it) added to the list
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 0  # jobs at a time; 0 = min(12, cores - 2)
    budget: float = 420.0  # seconds after which no new job starts
    cache: str = ""  # rendered sample designs; "" = <out>/cache (a folder of this run's own, never a shared one)

    def validate(self) -> None:
        check(bool(self.out), "out", "name a results folder")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        check(not unknown, "variants", f"unknown {unknown}; known: {sorted(VARIANTS)}")
        check(bool(self.seeds), "seeds", "name at least one seed")
        check(self.workers >= 0 and self.budget > 0, "workers", "workers >= 0 and budget > 0")


def sweep(cfg: SweepConfig) -> None:
    t0 = time.time()
    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or max(1, min(12, (os.cpu_count() or 2) - 2))
    extra = Path(cfg.extra).read_text() if cfg.extra.endswith(".json") else cfg.extra
    variants = {**{k: VARIANTS[k] for k in cfg.variants}, **json.loads(extra or "{}")}
    designs = {}
    for name, v in variants.items():
        sample = {**BASE_SAMPLE, **v.get("sample", {})}
        designs[name] = v.get("data") or str(render_design(sample, cache, os.cpu_count() or 2))
    print(f"rendered {len(set(designs.values()))} sample designs in {time.time() - t0:.0f} s", flush=True)
    jobs = [{"name": n, "seed": s, "variant": v, "data": designs[n], "out": str(out)}
            for s in cfg.seeds for n, v in variants.items()]
    running, rows = {}, []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below: no orphaned jobs
    try:
        with open(out / "sweep.jsonl", "a") as log:
            def on_row(r: dict) -> None:  # streamed as each job finishes
                rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(json.dumps(r), flush=True)
                (out / "sweep.md").write_text(summarise(rows))

            schedule(run_job, jobs, workers, cfg.budget, t0, running, on_row)
    finally:
        for p in running.values():
            p.kill()
    print(f"\n{len(rows)} jobs in {time.time() - t0:.0f} s; {len(jobs)} not started\n\n" + summarise(rows), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(SweepConfig, sweep, argv, prog="python -m research.proof_sweep", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
