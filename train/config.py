"""The trainer's typed config tree: one dataclass schema per component, loaded with `common.config.load_config`.

    cfg = load_config(TrainConfig, "configs/train/cpu.yaml", ["optim.lr=3e-4", "data.batch_size=4"])

Defaults are the published V-JEPA optimisation recipe (facebookresearch/jepa, ViT-L/16) around the model's
own defaults (ViT-tiny, 16x224x224); `configs/train/*.yaml` pick the model and data sizes. Steps are counted
from 1: "step k" is the k-th optimizer update, and `ckpt-k` holds the state after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from model.config import ModelConfig
from common.config import check
from pipeline.config import LoaderConfig


@dataclass
class MetricsConfig:
    enabled: bool = True
    addr: str = "127.0.0.1"  # loopback unless told otherwise
    base_port: int = 19400  # rank r serves on base_port + local_rank (not 9400: dcgm-exporter's)
    run_id: str = ""  # the `run` label of every series; "" = the name of the run folder
    nvml: bool = True  # GPU utilisation, NVDEC, memory, power through NVML; false next to dcgm-exporter
    nvml_interval: float = 2.0  # seconds between NVML samples
    # at exit, wait up to this long for one more scrape, so Prometheus sees how the run ended (its final step,
    # checkpoint and stop state); only when something has scraped the endpoint before; 0 = do not wait
    final_scrape_s: float = 30.0

    def validate(self) -> None:
        check(0 <= self.base_port <= 65535 - 64, "base_port", "must be a TCP port (0..65471)")
        check(self.nvml_interval > 0, "nvml_interval", "must be > 0")
        check(self.final_scrape_s >= 0, "final_scrape_s", "must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with per-step LR / weight decay from `train.schedules`, and the EMA of the target encoder."""

    lr: float = 6.25e-4  # peak LR, reached at the end of the warmup
    start_lr: float = 2e-4  # LR at step 0 (linear warmup from here)
    final_lr: float = 1e-6  # cosine floor (at the schedule horizon, never reached when horizon_scale > 1)
    warmup_steps: int = 12000
    weight_decay: float = 0.04  # at step 0 (cosine towards final_weight_decay); biases and norms get none
    final_weight_decay: float = 0.4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 10.0  # max grad norm of the encoder and of the predictor, each; 0 = off
    # clipping applies to the steps after this one: the reference clips from its first epoch after the warm-up
    # epochs, (40 + 1) x 300 = iteration 12,300 of the ViT-L/H recipes
    clip_start: int = 12300
    ema_start: float = 0.998  # target-encoder momentum, rising linearly to ema_end over the horizon
    ema_end: float = 1.0
    # cosine: warmup then cosine to final_lr at the horizon (V-JEPA's pretraining); wsd: warmup, constant lr, then
    # linear to final_lr over the last decay_steps of total_steps (V-JEPA 2's schedule, for continued pretraining)
    lr_schedule: str = "cosine"
    decay_steps: int = 0  # wsd only

    def validate(self) -> None:
        check(self.lr > 0 and self.start_lr >= 0 and self.final_lr >= 0, "lr",
              "lr must be > 0, start_lr and final_lr >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0 and self.final_weight_decay >= 0, "weight_decay",
              "weight_decay and final_weight_decay must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two values in [0, 1), got {list(self.betas)}")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 = off)")
        check(self.clip_start >= 0, "clip_start", "must be >= 0")
        check(0 <= self.ema_start <= self.ema_end <= 1, "ema_start",
              f"need 0 <= ema_start <= ema_end <= 1, got {self.ema_start} -> {self.ema_end}")
        check(self.lr_schedule in ("cosine", "wsd"), "lr_schedule", f"cosine or wsd, got {self.lr_schedule!r}")
        check(self.decay_steps >= 0, "decay_steps", "must be >= 0")


@dataclass
class ScheduleConfig:
    total_steps: int = 90000  # the length of the training run the schedules are laid out for
    # every schedule (LR cosine, weight decay, EMA) spans horizon_scale x total_steps, as the reference
    # does (1.25: training stops at 80% of the horizon, LR ~7.5e-5, EMA ~0.9996 on the ViT-L recipe)
    horizon_scale: float = 1.25
    # stop this invocation after this step (0 = total_steps); the schedules still span total_steps.
    # For time-boxed jobs (a SLURM time limit) and resume tests: the next run resumes from here.
    stop_at: int = 0

    @property
    def horizon(self) -> float:
        return self.horizon_scale * self.total_steps

    @property
    def last_step(self) -> int:
        return self.stop_at or self.total_steps

    def validate(self) -> None:
        check(self.total_steps >= 1, "total_steps", "must be >= 1")
        check(self.horizon_scale >= 1, "horizon_scale", "must be >= 1 (the horizon covers the run)")
        check(0 <= self.stop_at <= self.total_steps, "stop_at",
              f"must be 0 (= total_steps) or in [1, {self.total_steps}]")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also written at the last step of every invocation
    keep_last: int = 3  # older checkpoints are deleted; 0 keeps all
    dir: str = "checkpoints"  # inside run_dir (an absolute path is used as is)

    def validate(self) -> None:
        check(self.every_steps >= 1, "every_steps", "must be >= 1")
        check(self.keep_last >= 0, "keep_last", "must be >= 0 (0 = keep all)")
        check(bool(self.dir), "dir", "must name a folder")


@dataclass
class DDPConfig:
    """DistributedDataParallel settings (world size > 1); BENCHMARKS.md "DDP settings" has the measurements."""

    bucket_cap_mb: int = 25  # gradients are all-reduced in buckets of this size, overlapping the backward pass
    gradient_as_bucket_view: bool = True  # gradients live in the buckets: no copy into them, one set less memory
    # the set of used parameters never changes between steps (true of this model): lets DDP skip its per-step
    # search and overlap better; false is always valid
    static_graph: bool = True

    def validate(self) -> None:
        check(self.bucket_cap_mb >= 1, "bucket_cap_mb", "must be >= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    run_dir: str = "runs/train"  # config.yaml, losses.jsonl and checkpoints/; resumed from when present
    # a checkpoint (tubelet-import of released weights, or another run's) whose weights a new run starts from, with
    # a fresh optimizer; ignored once run_dir has checkpoints of its own (train/init_from.py)
    init_from: str = ""
    seed: int = 0  # model init (the data order, crops and masks follow data.seed)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable runs and resumes
    nonfinite: str = "stop"  # a NaN/inf loss or grad norm: stop (error naming the step) | skip (the update)
    log_every: int = 10  # steps between log lines (losses.jsonl gets every step)
    amp: str = "auto"  # auto (bf16 autocast on GPU, off on CPU) | bf16 | off
    device: str = "auto"  # auto | cpu | cuda
    # torch.compile the encoder + predictor (token counts as symbolic sizes) and the target encoder; the first
    # steps take the compile time (logged)
    compile: bool = False
    dist_timeout_s: int = 600  # collectives that wait longer fail (a dead or stuck peer)

    def validate(self) -> None:
        m, d = self.model, self.data
        check(d.num_frames == m.num_frames, "data.num_frames",
              f"{d.num_frames} != model.num_frames {m.num_frames}: the clips must have the model's frame count")
        check(d.crop_size == m.img_size, "data.crop_size",
              f"{d.crop_size} != model.img_size {m.img_size}: the clips must have the model's image size")
        if m.num_frames // m.tubelet_size > 1:  # video: V-JEPA's mask types (images: I-JEPA's data.image_masks)
            check(1 <= len(d.masks) <= m.num_mask_types, "data.masks",
                  f"{len(d.masks)} mask types, the predictor has model.num_mask_types={m.num_mask_types}")
        check(self.optim.warmup_steps < self.schedule.total_steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} must be < schedule.total_steps {self.schedule.total_steps}")
        if self.optim.lr_schedule == "wsd":
            check(self.optim.warmup_steps + self.optim.decay_steps <= self.schedule.total_steps, "optim.decay_steps",
                  f"warmup {self.optim.warmup_steps} + decay {self.optim.decay_steps} must fit in schedule.total_steps "
                  f"{self.schedule.total_steps}")
        check(self.nonfinite in ("stop", "skip"), "nonfinite", f"must be stop or skip, got {self.nonfinite!r}")
        check(self.amp in ("auto", "bf16", "off"), "amp", f"must be auto, bf16 or off, got {self.amp!r}")
        check(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        check(not (self.device == "cpu" and d.device == "cuda"), "data.device",
              "cuda with device=cpu: the clips must be on the training device")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(bool(self.run_dir), "run_dir", "must name a folder")
        check(self.dist_timeout_s >= 1, "dist_timeout_s", "must be >= 1")
