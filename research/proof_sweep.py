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
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import main_for
from common.config import check, load_config
from common.device import resolve_device
from common.files import atomic_open
from pipeline.clips import cut_clip
from pipeline.sampling import BatchPlan, Plan, frame_indices
from shards.synthetic.generate import SPLITS, plan_videos, scene_for
from shards.synthetic.render import SceneStyle, smooth_noise

RENDER_SHORT_SIDE = 128  # the clips are 64-96 px: rendering at 2x the crop is plenty
BASE_SAMPLE = {"motion": "object", "size_range": (0.08, 0.2), "bg_contrast": (15.0, 32.0), "train_per_class": 40,
               "val_per_class": 40}

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


# ---------------------------------------------------------------------------------------------- data


def _design_key(sample: dict) -> str:
    (lo, hi), (clo, chi) = sample["size_range"], sample["bg_contrast"]
    counts = f"tr{sample['train_per_class']}_va{sample['val_per_class']}"
    if sample["motion"] in ("camera", "discs"):
        return f"{sample['motion']}_{counts}"
    return f"size{lo:g}-{hi:g}_bg{clo:g}-{chi:g}_{counts}"


# One colour palette for every camera-motion clip: no per-clip colour for an encoder to latch on to.
_CAMERA_PALETTE = np.array([[40, 10, -20], [-15, 35, 10], [10, -20, 40]], np.float32)


def _bounce(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    span = hi - lo
    m = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(m > span, 2 * span - m, m)


def _render_camera(task: dict) -> np.ndarray:
    """The sample's five classes as whole-frame camera motions (pan across, pan up/down, roll, zoom, still)
    over periodic smooth colour noise with one shared palette, 96x96, with the task's frame count and rate."""
    rng = np.random.default_rng([SPLITS.index(task["split"]), task["cls_index"], task["index"], 99])
    n, c = task["num_frames"], task["cls_index"]
    tex = 128 + np.einsum("chw,dc->hwd", smooth_noise(rng, 3, 192, 192, rng.uniform(4, 8)), _CAMERA_PALETTE)
    img = torch.from_numpy(np.clip(tex, 0, 255)).permute(2, 0, 1)[None].float().repeat(1, 1, 2, 2)  # periodic
    t = torch.arange(n) / task["fps"]
    zero = torch.zeros(n)
    pan, roll, zoom = zero.clone(), torch.full((n,), float(rng.uniform(0, 2 * math.pi))), zero
    speed = rng.uniform(0.1, 0.2) * rng.choice([-1, 1])
    if c in (0, 1):
        pan = _bounce(torch.tensor(rng.uniform(-0.2, 0.2)) + speed * t, -0.25, 0.25)
    elif c == 2:
        roll = roll + rng.uniform(1.6, 3.5) * rng.choice([-1, 1]) * t
    elif c == 3:
        zoom = _bounce(torch.tensor(rng.uniform(0, 0.6)) + rng.uniform(0.4, 0.8) * rng.choice([-1, 1]) * t, 0, 0.6)
    dx, dy = (pan, zero) if c == 0 else (zero, pan)
    scale = 0.25 * torch.exp(-zoom)  # the frame shows a quarter of the tiled texture at zoom 0
    cos, sin = torch.cos(roll) * scale, torch.sin(roll) * scale
    theta = torch.stack([torch.stack([cos, -sin, 4 * (cos * dx - sin * dy)], -1),  # pans in frame coordinates
                         torch.stack([sin, cos, 4 * (sin * dx + cos * dy)], -1)], 1)
    grid = F.affine_grid(theta, (n, 3, 96, 96), align_corners=False)
    frames = F.grid_sample(img.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)
    return frames.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


DISC_CLASSES = 8  # pan directions, 45 degrees apart, counter-clockwise from "right"


def _render_discs(task: dict) -> np.ndarray:
    """A pan over a periodic field of bright discs on a faint dark texture, 96x96, 40 frames: the picture moves
    1-1.5 px per frame in direction 45 * cls_index degrees. A frame alone carries no label."""
    rng = np.random.default_rng([SPLITS.index(task["split"]), task["cls_index"], task["index"], 7])
    n, size, period = 40, 96, 256
    canvas = (30 + 6 * smooth_noise(rng, 3, period, period, 3.0).transpose(1, 2, 0)).astype(np.float64)
    for _ in range(70):  # each disc paints only its bounding box (+1 px), wrapped around the periodic canvas
        cy, cx = rng.uniform(0, period, 2)
        r = rng.uniform(6, 12)
        rows = np.arange(math.floor(cy - r - 1), math.ceil(cy + r + 1))
        cols = np.arange(math.floor(cx - r - 1), math.ceil(cx + r + 1))
        dy = ((rows - cy + period / 2) % period - period / 2)[:, None]
        dx = ((cols - cx + period / 2) % period - period / 2)[None, :]
        alpha = np.clip(r - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)[..., None]
        box = np.ix_(rows % period, cols % period)
        canvas[box] = canvas[box] * (1 - alpha) + alpha * rng.uniform(120, 255, 3).astype(np.float32)
    img = torch.from_numpy(np.clip(canvas, 0, 255).astype(np.float32)).permute(2, 0, 1)[None]
    speed, angle = rng.uniform(1.0, 1.5), math.radians(45 * task["cls_index"])
    y0, x0 = rng.uniform(0, period, 2)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    frames = []
    for i in range(n):  # the picture moves by (cos, -sin) * speed per frame: the window moves the other way
        tx = (x0 + xs - speed * math.cos(angle) * i) % period
        ty = (y0 + ys + speed * math.sin(angle) * i) % period
        grid = torch.stack([tx / period * 2 - 1, ty / period * 2 - 1], -1)[None]
        frames.append(F.grid_sample(img, grid, mode="bilinear", align_corners=False, padding_mode="border")[0])
    return torch.stack(frames).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _render(task: dict, design: dict) -> np.ndarray:
    if design["motion"] == "camera":
        return _render_camera(task)
    if design["motion"] == "discs":
        return _render_discs(task)
    style = SceneStyle(size_range=tuple(design["size_range"]), bg_contrast=tuple(design["bg_contrast"]))
    w, h = task["width"], task["height"]
    k = RENDER_SHORT_SIDE / min(w, h)
    task = {**task, "width": 2 * round(w * k / 2), "height": 2 * round(h * k / 2)}
    return np.stack(list(scene_for(task, style).frames()))


def _render_star(args):
    return _render(*args)


def render_design(sample: dict, cache: Path, workers: int) -> Path:
    """Render every video of a sample design once (train and val): {split: (list of uint8 [F, H, W, 3], labels)}."""
    path = cache / f"{_design_key(sample)}.pt"
    if path.exists():
        return path
    counts = {"train": sample["train_per_class"], "val": sample["val_per_class"]}
    if sample["motion"] == "discs":
        tasks = [{"split": split, "cls_index": c, "index": i} for split in SPLITS for c in range(DISC_CLASSES)
                 for i in range(counts[split])]
    else:
        tasks = plan_videos(0, counts)
    with mp.get_context("spawn").Pool(workers) as pool:  # not fork: callers hold threads (torch, DALI)
        frames = pool.map(_render_star, [(t, sample) for t in tasks], chunksize=4)
    data = {}
    for split in SPLITS:
        idx = [i for i, t in enumerate(tasks) if t["split"] == split]
        data[split] = ([torch.from_numpy(frames[i]) for i in idx], [tasks[i]["cls_index"] for i in idx])
    with atomic_open(path) as f:
        torch.save(data, f)
    return path


def sweep_plan(vids: List[torch.Tensor], d, train: bool, seed: int, batch_size: int, num_frames: int) -> Plan:
    """The product's sampling (`pipeline.sampling.Plan`) over rendered videos [F, H, W, 3]: the order, records
    (window, random resized crop per `d`'s crop_scale/crop_aspect, flip; or evaluation views) and masks."""
    return Plan([tuple(v.shape[:3]) for v in vids], batch_size=batch_size, seed=seed, train=train,
                num_frames=num_frames, stride=d.frame_stride, scale=d.crop_scale, ratio=d.crop_aspect, flip=d.flip,
                num_clips=d.eval_clips, num_crops=d.eval_crops)


def batch_clips(vids: List[torch.Tensor], bp: BatchPlan, num_frames: int, stride: int, size: int) -> torch.Tensor:
    """[B, 3, T, S, S]: the batch's clips, cut from the rendered videos by the product's definition of a clip."""
    return torch.stack([cut_clip(vids[r][frame_indices(rec.start, vids[r].shape[0], num_frames, stride)], rec, size)
                        for r, rec in zip(bp.rows, bp.records)])


# ---------------------------------------------------------------------------------------------- one job


class FrameDifferenceTokens(torch.nn.Module):
    """A control in place of an encoder: each token is the raw temporal difference of one 2x16x16 tubelet
    (768 numbers), i.e. local motion with no learning. What the probe can read from local motion alone."""

    embed_dim, num_heads = 768, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, T, S, S] -> [B, T/2 * (S/16)^2, 768]
        d = x[:, :, 1::2] - x[:, :, 0::2]
        B, C, T, S, _ = d.shape
        d = d.reshape(B, C, T, S // 16, 16, S // 16, 16).permute(0, 2, 3, 5, 1, 4, 6)
        return d.reshape(B, T * (S // 16) ** 2, C * 256)


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


def _job_main(job: dict, queue) -> None:
    try:
        queue.put(run_job(job))
    except BaseException as e:  # report, never hang the sweep
        queue.put({"name": job["name"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}"})


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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    running, rows = {}, []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below: no orphaned jobs
    try:
        with open(out / "sweep.jsonl", "a") as log:
            _schedule(workers, cfg.budget, t0, jobs, running, rows, ctx, queue, log, out)
    finally:
        for p in running.values():
            p.kill()
    print(f"\n{len(rows)} jobs in {time.time() - t0:.0f} s; {len(jobs)} not started\n\n" + summarise(rows), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(SweepConfig, sweep, argv, prog="python -m research.proof_sweep", doc=__doc__)


def _next_result(queue, running: dict, poll: float = 10.0) -> dict:
    """The next finished job's row; a job process that died without one (killed, crashed) gets an error row."""
    while True:
        try:
            return queue.get(timeout=poll)
        except Empty:
            dead = [key for key, p in running.items() if not p.is_alive()]
            if dead:
                try:
                    return queue.get(timeout=poll)  # it may have reported just before exiting
                except Empty:
                    name, seed = dead[0]
                    return {"name": name, "seed": seed,
                            "error": f"job process died without a result (exit code {running[dead[0]].exitcode})"}


def _schedule(workers, budget, t0, jobs, running, rows, ctx, queue, log, out) -> None:
    while jobs or running:
        while jobs and len(running) < workers and time.time() - t0 < budget:
            job = jobs.pop(0)
            p = ctx.Process(target=_job_main, args=(job, queue))
            p.start()
            running[(job["name"], job["seed"])] = p
        if not running:
            break
        r = _next_result(queue, running)
        running.pop((r["name"], r["seed"])).join()
        rows.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(json.dumps(r), flush=True)
        (out / "sweep.md").write_text(summarise(rows))


if __name__ == "__main__":
    raise SystemExit(main())
