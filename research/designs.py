"""The learning proof's rendered data: the sample designs (the built-in sample's scenes at a reduced resolution,
whole-frame camera motions, pans over a disc field), rendered once per design without a codec, and clips cut from
them with the product's sampling (`pipeline.sampling.Plan`) and definition of a clip (`pipeline.clips.cut_clip`).
Used by `research.proof_sweep` and `research.learning_proof`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from common.files import atomic_open
from pipeline.clips import cut_clip
from pipeline.sampling import BatchPlan, Plan, frame_indices
from shards.synthetic.generate import SPLITS, plan_videos, scene_for
from shards.synthetic.render import SceneStyle, smooth_noise

RENDER_SHORT_SIDE = 128  # the clips are 64-96 px: rendering at 2x the crop is plenty
BASE_SAMPLE = {"motion": "object", "size_range": (0.08, 0.2), "bg_contrast": (15.0, 32.0), "train_per_class": 40,
               "val_per_class": 40}


def design_key(sample: dict) -> str:
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


def render_camera(task: dict) -> np.ndarray:
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


def render_discs(task: dict) -> np.ndarray:
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
        return render_camera(task)
    if design["motion"] == "discs":
        return render_discs(task)
    style = SceneStyle(size_range=tuple(design["size_range"]), bg_contrast=tuple(design["bg_contrast"]))
    w, h = task["width"], task["height"]
    k = RENDER_SHORT_SIDE / min(w, h)
    task = {**task, "width": 2 * round(w * k / 2), "height": 2 * round(h * k / 2)}
    return np.stack(list(scene_for(task, style).frames()))


def _render_star(args):
    return _render(*args)


def render_design(sample: dict, cache: Path, workers: int) -> Path:
    """Render every video of a sample design once (train and val): {split: (list of uint8 [F, H, W, 3], labels)}."""
    path = cache / f"{design_key(sample)}.pt"
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
