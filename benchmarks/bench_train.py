"""`make bench-train`: the training step on synthetic clips + masks (no loader), with model FLOPs utilisation.

    python -m benchmarks.bench_train [size=base] [batch=8] [steps=20] [warmup=3] [img=224] [frames=16]
                                     [amp=auto|bf16|off] [train_config=YAML] [train=[key=value,...]] [out=FILE]

Times `train.step.train_step` (forward, backward, clipping, AdamW, EMA, the NaN guard's sync) exactly as the
trainer runs it, on random clips and masks drawn with the configured mask types, and what the collapse signals
(train/signals.py) add to a logged step. MFU = model FLOPs per second /
the matrix-multiply rate measured on this device in the same run (CPU: fp32 matmul; GPU: bf16 matmul), so it
says how much of what this device can actually do the step uses.

Model FLOPs are counted analytically from each step's real token counts (`step_flops`): 2 x weights x tokens for
every linear layer and the tubelet embedding, plus 4 N^2 D per attention layer (QK^T and AV); the target encoder
runs forward only on all N tokens; the encoder (on each mask type's context tokens) and the predictor (context +
target tokens) run forward and backward (backward = 2 x forward; 1 x for the tubelet embedding, whose input needs
no gradient). Norms, activations and the optimizer are not counted (the usual MFU convention).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.cli import main_for
from common.config import check, load_config
from model.config import VIT_SIZES, ModelConfig
from pipeline.masks import sample_masks
from train import dist
from train.config import TrainConfig
from train.step import build, step_signals, train_step


def vit_forward_flops(tokens: int, width: int, depth: int) -> float:
    """Transformer blocks on `tokens` tokens of one clip: linear layers (qkv, proj, fc1, fc2 = 12 D^2 weights)
    and attention scores/values (4 N^2 D)."""
    return depth * (2.0 * 12 * width * width * tokens + 4.0 * tokens * tokens * width)


def step_flops(cfg: ModelConfig, batch: int, masks: Sequence[Tuple[int, int]]) -> Dict[str, float]:
    """Model FLOPs of one training step. masks: (context tokens, target tokens) per mask type."""
    width, depth, _ = VIT_SIZES[cfg.size]
    n = int(np.prod(cfg.grid))
    embed = 2.0 * n * (3 * cfg.tubelet_size * cfg.patch_size**2) * width  # every token, before the gather
    target = embed + vit_forward_flops(n, width, depth)
    encoder_fwd = encoder_bwd = predictor_fwd = 0.0
    w = cfg.predictor_width
    for nc, nt in masks:
        blocks = vit_forward_flops(nc, width, depth)
        encoder_fwd += embed + blocks
        encoder_bwd += embed + 2 * blocks  # tubelet embedding: weight gradient only
        predictor_fwd += 2.0 * nc * width * w + vit_forward_flops(nc + nt, w, cfg.predictor_depth) + 2.0 * nt * w * width
    per_clip = {"target_encoder": target, "encoder": encoder_fwd + encoder_bwd, "predictor": 3 * predictor_fwd}
    out = {k: v * batch for k, v in per_clip.items()}
    out["total"] = sum(out.values())
    return out


def matmul_rate(device: torch.device, seconds: float = 2.0) -> Tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 on GPU, fp32 on CPU."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        reps += 4
        sync()
    return 2.0 * n**3 * reps / (time.perf_counter() - t0), f"{str(dtype).split('.')[-1]} {n}x{n}x{n}"


@dataclass
class BenchTrainConfig:
    train_config: str = ""  # a TrainConfig YAML (e.g. configs/train/vitl16.yaml); "" = the schema defaults
    train: List[str] = field(default_factory=list)  # further TrainConfig key=value overrides, e.g. [optim.lr=1e-3]
    size: str = ""  # shortcuts over the train config ("" / 0 = keep): model.size
    batch: int = 0  # data.batch_size (clips per step)
    img: int = 0  # model.img_size = data.crop_size
    frames: int = 0  # model.num_frames = data.num_frames
    amp: str = ""  # auto | bf16 | off
    steps: int = 20  # timed steps
    warmup: int = 3  # untimed steps before them
    out: str = ""  # also write the results as JSON here

    def validate(self) -> None:
        check(self.size in ("", *VIT_SIZES), "size", f"must be one of {sorted(VIT_SIZES)}")
        check(self.amp in ("", "auto", "bf16", "off"), "amp", "must be auto, bf16 or off")
        check(self.steps >= 1 and self.warmup >= 0, "steps", "steps >= 1 and warmup >= 0")


def train_config(args: BenchTrainConfig) -> TrainConfig:
    """The benchmarked TrainConfig: the file, the shortcuts, the overrides; metrics off."""
    extra = []
    if args.size:
        extra.append(f"model.size={args.size}")
    if args.batch:
        extra.append(f"data.batch_size={args.batch}")
    if args.img:
        extra += [f"model.img_size={args.img}", f"data.crop_size={args.img}"]
    if args.frames:
        extra += [f"model.num_frames={args.frames}", f"data.num_frames={args.frames}"]
    if args.amp:
        extra.append(f"amp={args.amp}")
    return load_config(TrainConfig, args.train_config or None, [*extra, *args.train, "metrics.enabled=false"])


def bench(args: BenchTrainConfig) -> None:
    cfg = train_config(args)
    env = dist.init(cfg.device)
    try:
        parts = build(cfg, env)
        B, grid = cfg.data.batch_size, cfg.model.grid
        rng = np.random.default_rng(0)
        clips = torch.randn(B, 3, cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size, device=env.device)
        batches = [SimpleNamespace(clips=clips, masks=[(torch.from_numpy(c), torch.from_numpy(t))
                                                       for c, t in sample_masks(rng, B, grid, cfg.data.masks)])
                   for _ in range(args.warmup + args.steps)]
        times: List[float] = []
        flops = 0.0
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            train_step(parts, b, i + 1)  # ends in a host sync (the NaN guard's .tolist())
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                flops += step_flops(cfg.model, B, [(c.shape[1], t.shape[1]) for c, t in b.masks])["total"]
        signal_s = signals_seconds(parts, batches[-1], env.device)
        peak, peak_what = matmul_rate(env.device)
    finally:
        dist.cleanup()

    total = sum(times)
    achieved = flops / total
    n = int(np.prod(grid))
    mean_tokens = [(statistics.mean(b.masks[k][0].shape[1] for b in batches),
                    statistics.mean(b.masks[k][1].shape[1] for b in batches)) for k in range(len(cfg.data.masks))]
    per_step = step_flops(cfg.model, B, [(round(c), round(t)) for c, t in mean_tokens])
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else (
        platform.processor() or platform.machine())
    result = {
        "size": cfg.model.size, "clip": [cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size],
        "tokens": n, "batch": B, "device": f"{env.device.type}: {device_name}",
        "threads": torch.get_num_threads(), "amp": "bf16" if parts.amp else "off", "steps": len(times),
        "step_seconds_mean": total / len(times), "step_seconds_median": statistics.median(times),
        "clips_per_second": B * len(times) / total,
        "context_target_tokens": [[round(c, 1), round(t, 1)] for c, t in mean_tokens],
        "model_flops_per_step": flops / len(times), "model_flops_split": per_step,
        "achieved_flops_per_second": achieved, "matmul_flops_per_second": peak, "matmul": peak_what,
        "mfu": achieved / peak, "signals_seconds": signal_s,
        "signals_share_of_step": signal_s / statistics.median(times),
    }
    precision = "bf16 autocast" if parts.amp else f"fp32, {result['threads']} threads"
    print(f"bench_train: ViT-{cfg.model.size}/{cfg.model.patch_size}, {cfg.model.num_frames}x{cfg.model.img_size}"
          f"x{cfg.model.img_size} ({n} tokens), batch {B}, {result['device']}, {precision}")
    rows = [
        ("step time (median / mean)", f"{result['step_seconds_median']:.3f} s / {result['step_seconds_mean']:.3f} s"),
        ("clips/s", f"{result['clips_per_second']:.2f}"),
        ("context / target tokens", ", ".join(f"{c:.0f}/{t:.0f}" for c, t in mean_tokens)),
        ("model FLOPs per step", f"{result['model_flops_per_step'] / 1e12:.3f} TFLOP (target enc "
         f"{per_step['target_encoder'] / per_step['total']:.0%}, encoder {per_step['encoder'] / per_step['total']:.0%}, "
         f"predictor {per_step['predictor'] / per_step['total']:.0%})"),
        ("achieved", f"{achieved / 1e12:.3f} TFLOP/s"),
        ("matmul rate (measured)", f"{peak / 1e12:.3f} TFLOP/s ({peak_what})"),
        ("MFU", f"{result['mfu']:.1%}"),
        ("collapse signals", f"{1000 * signal_s:.1f} ms per logged step = {result['signals_share_of_step']:.2%} of a "
                             f"step (every log_every steps: {result['signals_share_of_step'] / cfg.log_every:.3%})"),
    ]
    for k, v in rows:
        print(f"  {k:<28} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


def signals_seconds(parts, batch, device: torch.device, reps: int = 5) -> float:
    """What the collapse signals add to a logged step (train.step.step_signals on this step's features and
    predictions, the host sync included), median of `reps`."""
    clips = batch.clips.to(device)
    masks = [(c.to(device), t.to(device)) for c, t in batch.masks]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=parts.amp):
        features = parts.model.target_features(clips)
        preds = parts.student(clips, masks)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step_signals(features, preds[0], masks[0][1], features.size(1))  # ends in .tolist(): synced
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchTrainConfig, bench, argv, prog="python -m benchmarks.bench_train", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
