"""`make bench-train`: the training step on synthetic clips + masks (no loader), with model FLOPs utilisation, per
model size.

    python -m benchmarks.bench_train [sizes=[base,large,huge]] [batch=24] [steps=20] [warmup=3] [img=224]
        [frames=16] [amp=auto|bf16|off] [max_batch=true] [max_batch_tries=8] [max_batch_limit=1024]
        [train_config=YAML] [train=[key=value,...]] [--json FILE]

Times `train.step.train_step` (forward, backward, clipping, fused AdamW, EMA, the device-side NaN guard) exactly
as the trainer runs it, on random clips and masks drawn with the configured mask types: the timed steps are
queued back to back and read once at the end, as the trainer reads them every `log_every` steps. Per size: step
time, clips/s, MFU, peak device memory, the first step's time (torch.compile's included with
train=[compile=true]), and what the collapse signals (train/signals.py) add to a logged step; with max_batch,
the largest batch per GPU that fits, searched on one built model per size in at most `max_batch_tries` tries of
two steps up to `max_batch_limit` (a bound, ">= N", when the tries end first; on the CPU only the limit stops it). MFU = model FLOPs per second / the matrix-multiply rate measured on
this device in the same run (CPU: fp32 matmul; GPU: bf16 matmul), so it says how much of what this device can
actually do the step uses. `--json FILE` (or json=FILE) also writes the rows, rewritten after each row (a timeout
keeps the rows measured before it). Under torchrun it measures the DDP step (rank 0 reports).

Model FLOPs are counted analytically from each step's real token counts (`step_flops`): 2 x weights x tokens for
every linear layer and the tubelet embedding, plus 4 N^2 D per attention layer (QK^T and AV); the target encoder
runs forward only on all N tokens; the encoder (on each mask type's context tokens) and the predictor (context +
target tokens) run forward and backward (backward = 2 x forward; 1 x for the tubelet embedding, whose input needs
no gradient). Norms, activations, the optimizer and activation checkpointing's recomputed forward are not
counted (the usual MFU convention); the tests check the count against torch's FlopCounterMode.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.cli import main_for
from common.config import check, load_config
from common.files import atomic_write
from model.config import VIT_SIZES, ModelConfig
from pipeline.masks import sample_masks
from train import dist
from train.config import TrainConfig
from train.step import attention_backend, build, read_stats, step_signals, train_step


def vit_forward_flops(tokens: int, width: int, depth: int, hidden: int = 0) -> float:
    """Transformer blocks on `tokens` tokens of one clip: linear layers (qkv, proj: 4 D^2 weights; fc1, fc2:
    2 D x hidden, hidden = 4 D unless given) and attention scores/values (4 N^2 D)."""
    hidden = hidden or 4 * width
    return depth * (2.0 * (4 * width * width + 2 * width * hidden) * tokens + 4.0 * tokens * tokens * width)


def step_flops(cfg: ModelConfig, batch: int, masks: Sequence[Tuple[int, int]]) -> Dict[str, float]:
    """Model FLOPs of one training step. masks: (context tokens, target tokens) per mask type."""
    width, depth, _ = cfg.encoder_shape
    n = int(np.prod(cfg.grid))
    embed = 2.0 * n * (3 * cfg.tubelet_size * cfg.patch_size**2) * width  # every token, before the gather
    target = embed + vit_forward_flops(n, width, depth, cfg.mlp_hidden)
    encoder_fwd = encoder_bwd = predictor_fwd = 0.0
    w = cfg.predictor_width
    for nc, nt in masks:
        blocks = vit_forward_flops(nc, width, depth, cfg.mlp_hidden)
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
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        reps += 4
        sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0), f"{str(dtype).split('.')[-1]} {n}x{n}x{n}"


@dataclass
class BenchTrainConfig:
    train_config: str = ""  # a TrainConfig YAML (e.g. configs/train/vitl16.yaml); "" = the schema defaults
    train: List[str] = field(default_factory=list)  # further TrainConfig key=value overrides, e.g. [compile=true]
    sizes: List[str] = field(default_factory=list)  # one row per model size; [] = the train config's model.size
    batch: int = 0  # shortcuts over the train config ("" / 0 = keep): data.batch_size (clips per step and GPU)
    img: int = 0  # model.img_size = data.crop_size
    frames: int = 0  # model.num_frames = data.num_frames
    amp: str = ""  # auto | bf16 | off
    steps: int = 20  # timed steps
    warmup: int = 3  # untimed steps before them (the first one compiles with compile=true)
    max_batch: bool = False  # also find the largest batch per GPU that fits, per size (two steps per try)
    max_batch_tries: int = 8  # tries of the search per size (doubling from `batch`, then bisection)
    max_batch_limit: int = 1024  # never try more clips per GPU than this (on the CPU: the only stop)
    json: str = ""  # also write the rows as JSON here (`--json FILE` works too)

    def validate(self) -> None:
        for i, size in enumerate(self.sizes):
            check(size in VIT_SIZES, f"sizes.{i}", f"{size!r} is not one of {sorted(VIT_SIZES)}")
        check(self.amp in ("", "auto", "bf16", "off"), "amp", "must be auto, bf16 or off")
        check(self.steps >= 1 and self.warmup >= 1, "steps", "steps >= 1 and warmup >= 1")
        check(self.max_batch_tries >= 1 and self.max_batch_limit >= 1, "max_batch_tries",
              "max_batch_tries >= 1 and max_batch_limit >= 1")


def train_config(args: BenchTrainConfig, size: str = "", batch: int = 0) -> TrainConfig:
    """The benchmarked TrainConfig: the file, the shortcuts, the overrides; metrics off."""
    extra = []
    if size:
        extra.append(f"model.size={size}")
    if batch or args.batch:
        extra.append(f"data.batch_size={batch or args.batch}")
    if args.img:
        extra += [f"model.img_size={args.img}", f"data.crop_size={args.img}"]
    if args.frames:
        extra += [f"model.num_frames={args.frames}", f"data.num_frames={args.frames}"]
    if args.amp:
        extra.append(f"amp={args.amp}")
    return load_config(TrainConfig, args.train_config or None, [*extra, *args.train, "metrics.enabled=false"])


def synthetic_batches(cfg: TrainConfig, device: torch.device, n: int, seed: int = 0) -> List[SimpleNamespace]:
    """`n` batches of one random clip tensor (on the device) and freshly drawn masks of the configured types."""
    B, m = cfg.data.batch_size, cfg.model
    rng = np.random.default_rng(seed)
    clips = torch.randn(B, 3, m.num_frames, m.img_size, m.img_size, device=device)
    return [SimpleNamespace(clips=clips, masks=[(torch.from_numpy(c), torch.from_numpy(t))
                                                for c, t in sample_masks(rng, B, m.grid, cfg.data.masks)])
            for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: BenchTrainConfig, cfg: TrainConfig, env: dist.DistEnv) -> Dict:
    """One size: warm-up steps, then `steps` timed steps queued back to back and read at the end."""
    dev = env.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    parts = build(cfg, env)
    batches = synthetic_batches(cfg, dev, args.warmup + args.steps)
    t0 = time.perf_counter()
    train_step(parts, batches[0], 1)
    sync(dev)
    first_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        train_step(parts, batches[i], i + 1)
    sync(dev)
    host_times, results = [], []
    t_start = time.perf_counter()
    for i in range(args.warmup, len(batches)):
        t0 = time.perf_counter()
        results.append(train_step(parts, batches[i], i + 1))
        host_times.append(time.perf_counter() - t0)
    stats = read_stats(results)  # waits for the device: the timed steps are done
    total = time.perf_counter() - t_start
    if any(bad for _, _, bad in stats):
        raise RuntimeError(f"non-finite loss in the benchmark of ViT-{cfg.model.size}: {[s[0] for s in stats]}")
    timed = batches[args.warmup:]
    flops = sum(step_flops(cfg.model, cfg.data.batch_size, [(c.shape[1], t.shape[1]) for c, t in b.masks])["total"]
                for b in timed)
    mean_tokens = [(statistics.mean(b.masks[k][0].shape[1] for b in timed),
                    statistics.mean(b.masks[k][1].shape[1] for b in timed)) for k in range(len(cfg.data.masks))]
    signal_s = signals_seconds(parts, timed[-1], dev)
    updates = update_seconds(parts, dev)
    row = {
        "size": cfg.model.size, "params_encoder": sum(p.numel() for p in parts.model.encoder.parameters()),
        "clip": [cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size], "tokens": int(np.prod(cfg.model.grid)),
        "batch": cfg.data.batch_size, "world_size": env.world_size, "amp": "bf16" if parts.amp else "off",
        "compile": cfg.compile, "activation_checkpointing": cfg.model.activation_checkpointing,
        "attention": attention_backend(cfg, dev, parts.amp), "optimizer": "fused" if parts.fused else "foreach",
        "steps": len(timed), "step_seconds_mean": total / len(timed),
        "host_seconds_median": statistics.median(host_times), "first_step_seconds": first_s,
        "clips_per_second": cfg.data.batch_size * len(timed) / total,
        "context_target_tokens": [[round(c, 1), round(t, 1)] for c, t in mean_tokens],
        "model_flops_per_step": flops / len(timed),
        "model_flops_split": step_flops(cfg.model, cfg.data.batch_size, [(round(c), round(t)) for c, t in mean_tokens]),
        "achieved_flops_per_second": flops / total,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "signals_seconds": signal_s, "signals_share_of_step": signal_s / (total / len(timed)), **updates,
    }
    del parts, batches
    free_memory(dev)
    return row


def timed(fn, device: torch.device, reps: int = 10) -> float:
    """Median seconds of `fn()` (synced), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def update_seconds(parts, device: torch.device) -> Dict[str, float]:
    """The step's weight updates against what they replaced, on this size's parameters and gradients: AdamW fused
    vs foreach (both built here, on copies of the weights); the EMA as the step runs it (its weights on the device:
    no host read) vs one lerp with a host weight (what it would need to be one pass without a host sync)."""
    out = {}
    model = parts.model
    for kind in ("fused", "foreach"):
        params = [p.detach().clone().requires_grad_() for p in list(model.encoder.parameters())
                  + list(model.predictor.parameters())]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.04}], lr=1e-4, **{kind: True})
        out[f"adamw_{kind}_seconds"] = timed(opt.step, device)
        del params, opt
    tgt = [p.detach().clone() for p in model.target_encoder.parameters()]
    src = [p.detach() for p in model.encoder.parameters()]
    keep = torch.zeros((), device=device)
    out["ema_seconds"] = timed(lambda: model.ema_update(0.999, skip=keep), device)
    out["ema_lerp_seconds"] = timed(lambda: torch._foreach_lerp_(tgt, src, 0.001), device)
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(parts, cfg: TrainConfig, batch: int, device: torch.device) -> bool:
    """Two steps of the built model at `batch` clips run without running out of device memory."""
    cfg = replace(cfg, data=replace(cfg.data, batch_size=batch))
    batches = None
    try:
        batches = synthetic_batches(cfg, device, 2)
        for i, b in enumerate(batches):
            train_step(parts, b, i + 1)
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del batches
        parts.optimizer.zero_grad(set_to_none=True)
        free_memory(device)


def largest_batch(args: BenchTrainConfig, cfg: TrainConfig, env: dist.DistEnv) -> Tuple[int, bool]:
    """(largest batch per GPU that fits, exact): doubling from the config's batch, then bisection, on one built
    model, in at most `max_batch_tries` tries and never above `max_batch_limit`. exact is False when the tries
    ran out first: the batch is then a lower bound."""
    parts = build(cfg, env)
    tries = [0]

    def fits_(batch: int) -> bool:
        tries[0] += 1
        return fits(parts, cfg, batch, env.device)

    try:
        lo, hi = 0, None  # the largest batch known to fit, the smallest known not to
        batch = min(max(cfg.data.batch_size, 1), args.max_batch_limit)
        while tries[0] < args.max_batch_tries:
            if fits_(batch):
                lo = batch
                if lo == args.max_batch_limit:
                    return lo, True  # as much as asked for
            else:
                hi = batch
            if hi is None:
                batch = min(2 * lo, args.max_batch_limit)
            elif hi - lo <= 1:
                return lo, True
            else:
                batch = (lo + hi) // 2
        return lo, False
    finally:
        parts = None  # the model's memory is released before the cache is emptied
        free_memory(env.device)


def bench(args: BenchTrainConfig) -> List[Dict]:
    base = train_config(args)
    env = dist.init(base.device)
    rows: List[Dict] = []
    try:
        peak, peak_what = matmul_rate(env.device)
        device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else (
            platform.processor() or platform.machine())
        machine = {"device": f"{env.device.type}: {device_name}", "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "cuda": torch.version.cuda, "matmul_flops_per_second": peak,
                   "matmul": peak_what}
        for size in args.sizes or [base.model.size]:
            cfg = train_config(args, size)
            row = measure(args, cfg, env)
            row["mfu"] = row["achieved_flops_per_second"] / peak
            if args.max_batch:
                row["max_batch"], row["max_batch_exact"] = largest_batch(args, cfg, env)
            rows.append(row)
            if env.is_main:
                print_row(row, cfg, peak, peak_what)
                if args.json:  # after every row: a timeout keeps what was measured
                    atomic_write(args.json, json.dumps({"machine": machine, "rows": rows}, indent=2))
    finally:
        dist.cleanup()
    if env.is_main:
        print_table(rows, machine)
        if args.json:
            print(f"wrote {args.json}")
    return rows


def print_row(r: Dict, cfg: TrainConfig, peak: float, peak_what: str) -> None:
    split = r["model_flops_split"]
    m = cfg.model
    print(f"bench_train: ViT-{m.size}/{m.patch_size}, {m.num_frames}x{m.img_size}x{m.img_size} ({r['tokens']} tokens), "
          f"batch {r['batch']} x {r['world_size']} rank(s), {'bf16 autocast' if r['amp'] == 'bf16' else 'fp32'}, "
          f"attention {r['attention']}, {r['optimizer']} AdamW" + (", compiled" if r["compile"] else "")
          + (", activation checkpointing" if r["activation_checkpointing"] else ""))
    lines = [
        ("step time (mean)", f"{r['step_seconds_mean']:.3f} s (host per step, median: {r['host_seconds_median']:.3f} s)"),
        ("first step", f"{r['first_step_seconds']:.1f} s" + (" (torch.compile included)" if r["compile"] else "")),
        ("clips/s", f"{r['clips_per_second']:.2f}"),
        ("context / target tokens", ", ".join(f"{c:.0f}/{t:.0f}" for c, t in r["context_target_tokens"])),
        ("model FLOPs per step", f"{r['model_flops_per_step'] / 1e12:.3f} TFLOP (target enc "
         f"{split['target_encoder'] / split['total']:.0%}, encoder {split['encoder'] / split['total']:.0%}, "
         f"predictor {split['predictor'] / split['total']:.0%})"),
        ("achieved", f"{r['achieved_flops_per_second'] / 1e12:.3f} TFLOP/s"),
        ("matmul rate (measured)", f"{peak / 1e12:.3f} TFLOP/s ({peak_what})"),
        ("MFU", f"{r['mfu']:.1%}"),
        ("peak memory", gib(r["peak_memory_bytes"])),
        ("collapse signals", f"{1000 * r['signals_seconds']:.1f} ms per logged step = {r['signals_share_of_step']:.2%} "
                             f"of a step (every log_every steps: {r['signals_share_of_step'] / cfg.log_every:.3%})"),
    ]
    lines.append(("AdamW step", f"fused {1000 * r['adamw_fused_seconds']:.1f} ms, foreach "
                                f"{1000 * r['adamw_foreach_seconds']:.1f} ms"))
    lines.append(("EMA", f"as the step runs it {1000 * r['ema_seconds']:.1f} ms (one lerp with a host weight: "
                         f"{1000 * r['ema_lerp_seconds']:.1f} ms)"))
    if "max_batch" in r:
        lines.append(("largest batch that fits", max_batch_text(r)))
    for k, v in lines:
        print(f"  {k:<28} {v}")


def max_batch_text(r: Dict) -> str:
    return "-" if "max_batch" not in r else f"{'' if r['max_batch_exact'] else '>= '}{r['max_batch']}"


def gib(n: Optional[int]) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.1f} GiB"


def print_table(rows: List[Dict], machine: Dict) -> None:
    """The rows as a markdown table (BENCHMARKS.md's format)."""
    print(f"\n{machine['device']}, torch {machine['torch']}, matmul {machine['matmul_flops_per_second'] / 1e12:.1f} "
          f"TFLOP/s ({machine['matmul']})")
    print("| model | batch | step | clips/s | MFU | peak memory | first step | largest batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| ViT-{r['size']} | {r['batch']} | {r['step_seconds_mean']:.3f} s | {r['clips_per_second']:.1f} | "
              f"{r['mfu']:.1%} | {gib(r['peak_memory_bytes'])} | {r['first_step_seconds']:.1f} s | "
              f"{max_batch_text(r)} |")


def signals_seconds(parts, batch, device: torch.device, reps: int = 5) -> float:
    """What the collapse signals add to a logged step (train.step.step_signals on this step's features and
    predictions, the host sync included), median of `reps`."""
    clips = batch.clips.to(device)
    masks = [(c.to(device), t.to(device)) for c, t in batch.masks]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=parts.amp):
        features = parts.model.target_features(clips)
        preds = parts.student(clips, masks)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step_signals(features, preds[0], masks[0][1], features.size(1))  # ends in .tolist(): synced
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BenchTrainConfig, bench, argv, prog="python -m benchmarks.bench_train",
                    doc=__doc__, flags={"--json": "json"})


if __name__ == "__main__":
    raise SystemExit(main())
