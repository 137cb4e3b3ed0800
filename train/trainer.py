"""V-JEPA pretraining loop.

    python -m train.trainer [--config configs/train/cpu.yaml] [key=value ...]
    torchrun --nproc-per-node=8 -m train.trainer --config configs/train/vitl16.yaml run_dir=runs/vitl16

Builds the model, the optimizer and the streaming loader from one `TrainConfig`, resumes from the newest
complete checkpoint in `run_dir/checkpoints` when there is one (exact resume: weights, optimizer moments, and
the loader's (epoch, position), so the next batch is the one that would have come), writes the resolved
config to `run_dir/config.yaml` and every step to `run_dir/losses.jsonl` (rank 0), and trains to
`schedule.stop_at or schedule.total_steps`. Restarting the same command continues the run: that is all
`torchrun --max-restarts=N` needs. `run_dir` must be shared by all nodes (checkpoints are read by every rank).

Steps are counted from 1; checkpoint k holds the state after step k. The encoder and the predictor are trained
under DistributedDataParallel; the target encoder is not wrapped: every rank updates it by EMA from the same
(synchronised) weights, and the ranks are checked to hold identical parameters at start and end.

Fault injection (for the reliability tests; each is read once at start):
    TUBELET_FAULT_KILL=RANK:STEP     rank RANK SIGKILLs itself when it reaches step STEP (first attempt only:
                                     TORCHELASTIC_RESTART_COUNT unset or 0), as a node failure would.
    TUBELET_FAULT_NAN=STEP           the loss of step STEP is NaN (on every rank; RANK:STEP: on that rank only).
    TUBELET_FAULT_KILL_IN_CKPT=STEP  rank 0 SIGKILLs itself half-way through writing checkpoint STEP (first
                                     attempt only); the previous checkpoint must still load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.vjepa import VJEPA, l1_loss
from common.config import load_config, to_dict, to_yaml
from pipeline.loader import Batch, VideoLoader
from train import checkpoint, dist, schedules
from train.config import TrainConfig
from train.metrics import StepStats, build_metrics
from train.plots import plot_losses


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient with nonfinite=stop; the message names the step."""


# ----------------------------------------------------------------------------------------------------
# fault injection


@dataclass(frozen=True)
class Faults:
    kill: Optional[Tuple[int, int]] = None  # (rank, step)
    nan: Optional[Tuple[Optional[int], int]] = None  # (rank or None = all, step)
    kill_in_ckpt: Optional[int] = None  # step

    @classmethod
    def from_env(cls, env=os.environ) -> "Faults":
        def pair(name: str, rank_optional: bool):
            raw = env.get(name, "").strip()
            if not raw:
                return None
            try:
                parts = [int(x) for x in raw.split(":")]
            except ValueError:
                parts = []
            if len(parts) == 2 or (rank_optional and len(parts) == 1):
                return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
            raise ValueError(f"{name}={raw!r}: expected {'[RANK:]STEP' if rank_optional else 'RANK:STEP'}")

        first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        kill = pair("TUBELET_FAULT_KILL", False)
        in_ckpt = pair("TUBELET_FAULT_KILL_IN_CKPT", True)
        return cls(kill=kill if first_attempt else None, nan=pair("TUBELET_FAULT_NAN", True),
                   kill_in_ckpt=in_ckpt[1] if in_ckpt and first_attempt else None)

    def maybe_kill(self, rank: int, step: int) -> None:
        if self.kill == (rank, step):
            print(f"[fault injection] rank {rank}: SIGKILL at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def nan_at(self, rank: int, step: int) -> bool:
        return self.nan is not None and self.nan[1] == step and self.nan[0] in (None, rank)


# ----------------------------------------------------------------------------------------------------
# the step


class Student(nn.Module):
    """The trained networks, encoder + predictor, as one module: DDP wraps exactly these, with one forward
    per backward. clips [B, 3, T, H, W], masks [(ctx [B, Nc], tgt [B, Nt])] -> [B, Nt, D] per mask type."""

    def __init__(self, model: VJEPA):
        super().__init__()
        self.encoder, self.predictor = model.encoder, model.predictor

    # the model's own context path (it reads only self.encoder and self.predictor): one definition of it
    forward = VJEPA.forward_context


@dataclass
class Parts:
    """What the step needs: built once by `build`."""

    cfg: TrainConfig
    env: dist.DistEnv
    model: VJEPA  # encoder, predictor, target encoder (unwrapped: checkpoints and EMA use these)
    student: nn.Module  # Student, DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    amp: bool  # bf16 autocast


@dataclass
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float  # encoder and predictor together, before clipping
    lr: float
    weight_decay: float
    ema: float
    nonfinite: bool  # the update was not applied


def grad_norm_(params: List[nn.Parameter], clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients; scaled down to `clip` when clip > 0 and the norm exceeds it."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def train_step(p: Parts, batch: Batch, step: int, force_nan: bool = False) -> StepResult:
    """One optimizer update (step counted from 1). Applies nothing when the loss or gradients are non-finite
    on any rank; the caller decides to stop or skip."""
    o, horizon = p.cfg.optim, p.cfg.schedule.horizon
    lr = schedules.lr(step, peak=o.lr, start=o.start_lr, final=o.final_lr, warmup=o.warmup_steps, horizon=horizon)
    wd = schedules.weight_decay(step, start=o.weight_decay, final=o.final_weight_decay, horizon=horizon)
    ema = schedules.ema_momentum(step - 1, start=o.ema_start, end=o.ema_end, horizon=horizon)
    for group in p.optimizer.param_groups:
        group["lr"] = lr
        if group["apply_wd"]:  # biases and norm parameters keep 0
            group["weight_decay"] = wd

    dev = p.env.device
    clips = batch.clips.to(dev, non_blocking=True)  # [B, 3, T, H, W]
    clips = clips if p.amp else clips.float()
    masks = [(c.to(dev, non_blocking=True), t.to(dev, non_blocking=True)) for c, t in batch.masks]
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.amp):
        targets = p.model.forward_target(clips, masks)  # [B, Nt, D] per mask type, no grad
        preds = p.student(clips, masks)  # [B, Nt, D] per mask type; DDP all-reduces grads in backward
        loss = l1_loss(preds, targets)
    if force_nan:
        loss = loss * float("nan")
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()

    clip = o.clip_grad if step > o.warmup_steps else 0.0  # the reference clips only after warmup
    norm = torch.hypot(grad_norm_(list(p.model.encoder.parameters()), clip),
                       grad_norm_(list(p.model.predictor.parameters()), clip))
    # The one sync point of the step (.item()): every rank must agree on the NaN guard before the optimizer
    # touches the weights. Gradients are identical on all ranks after DDP; losses are summed for the log.
    loss32 = loss.detach().float()
    bad = (~torch.isfinite(loss32) | ~torch.isfinite(norm)).float()
    loss_sum, n_bad = dist.all_reduce(torch.stack([loss32, bad]), "sum").tolist()
    result = StepResult(loss_sum / p.env.world_size, float(norm), lr, wd, ema, nonfinite=n_bad > 0)
    if result.nonfinite:
        p.optimizer.zero_grad(set_to_none=True)
        return result
    p.optimizer.step()
    p.model.ema_update(ema)  # from identical weights on every rank: the target encoders stay identical
    return result


# ----------------------------------------------------------------------------------------------------
# building and resuming


def resolve_amp(amp: str, device: torch.device) -> bool:
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def build(cfg: TrainConfig, env: dist.DistEnv) -> Parts:
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights (checked after resume)
    model = VJEPA.from_config(cfg.model).to(env.device)
    student: nn.Module = Student(model)
    if env.world_size > 1:
        # the only buffers are the fixed pos_embed tables: nothing to sync before each forward
        student = DDP(student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      forward_sync_buffers=False)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.start_lr, betas=tuple(o.betas),
                                  eps=o.eps)
    return Parts(cfg, env, model, student, optimizer, resolve_amp(cfg.amp, env.device))


def checkpoint_state(p: Parts, loader: VideoLoader, step: int, skipped: int, config: dict) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if p.env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(p.env.device)
    return {"step": step, "skipped_steps": skipped, "encoder": p.model.encoder.state_dict(),
            "predictor": p.model.predictor.state_dict(), "target_encoder": p.model.target_encoder.state_dict(),
            "optimizer": p.optimizer.state_dict(), "loader": loader.state_dict(), "rng": rng, "config": config}


def restore(p: Parts, loader: VideoLoader, state: dict) -> Tuple[int, int]:
    """Load a checkpoint's parts; returns (step, skipped_steps)."""
    p.model.encoder.load_state_dict(state["encoder"])
    p.model.predictor.load_state_dict(state["predictor"])
    p.model.target_encoder.load_state_dict(state["target_encoder"])
    p.optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and p.env.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], p.env.device)
    return int(state["step"]), int(state.get("skipped_steps", 0))


def find_resume_point(ckpt_dir: Path, env: dist.DistEnv) -> Optional[dict]:
    """Rank 0 picks the newest loadable checkpoint (falling back past unreadable ones, loudly); every rank
    then loads that same file. None: a fresh run."""
    step, found, error = 0, None, None
    if env.is_main:
        try:
            found = checkpoint.load_latest(ckpt_dir, log=dist.print0)
            step = found[1]["step"] if found else 0
        except Exception as e:  # tell the other ranks before raising, so they do not wait for a broadcast
            step, error = -1, e
    step = dist.broadcast_int(step, env.device)
    if error is not None:
        raise error
    if step < 0:
        raise checkpoint.CheckpointError(f"rank 0 could not load any checkpoint in {ckpt_dir} (see its log)")
    if step == 0:
        return None
    if found is not None:
        dist.print0(f"resuming from {found[0]} (step {step})")
        return found[1]
    return checkpoint.load(checkpoint.path_for(ckpt_dir, step))


def resume(p: Parts, loader: VideoLoader, cfg: TrainConfig, config: dict) -> Tuple[int, int, int]:
    """Restore the newest checkpoint of run_dir if any, check the ranks agree, write run_dir/config.yaml and cut
    losses.jsonl back to the resume point. Returns (step, skipped_steps, tensors checked across ranks)."""
    run_dir, env = Path(cfg.run_dir), p.env
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    step, skipped, state = 0, 0, find_resume_point(run_dir / cfg.checkpoint.dir, env)
    if state is not None:
        changed = config_changes(state["config"], config)
        if changed:
            dist.print0("note: config differs from the checkpoint's: " + "; ".join(changed))
        step, skipped = restore(p, loader, state)
    n = dist.assert_same_across_ranks(_weights(p.model))
    if env.is_main:
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        trim_losses(run_dir / "losses.jsonl", step)
    return step, skipped, n


def config_changes(old: dict, new: dict, prefix: str = "") -> List[str]:
    """Keys whose values differ between two config dicts (the checkpoint's and this run's)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trim_losses(path: Path, step: int) -> None:
    """Keep the rows of losses.jsonl up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    write_atomic(path, "".join(ln + "\n" for ln in keep))


class RunLog:
    """Rank 0: every step to losses.jsonl, a line to stdout every `every` steps (window averages)."""

    def __init__(self, path: Path, every: int, last_step: int, world_size: int, enabled: bool):
        self.every, self.last_step, self.world_size, self.enabled = every, last_step, world_size, enabled
        self.file = open(path, "a") if enabled else None
        self.window: List[dict] = []

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.window.append(row)
        if row["step"] % self.every and row["step"] != self.last_step:
            return
        w, self.window = self.window, []
        step_s, data_s = sum(r["step_s"] for r in w), sum(r["data_s"] for r in w)
        clips = sum(r["clips"] for r in w) * self.world_size
        losses = [r["loss"] for r in w if not r["skipped"]]
        loss = sum(losses) / len(losses) if losses else float("nan")
        print(f"step {row['step']:>7}/{self.last_step} | loss {loss:.4f} | lr {row['lr']:.3e} | "
              f"{clips / step_s:7.1f} clips/s | step {step_s / len(w):.3f} s | data wait {data_s / step_s:4.0%}"
              + (f" | skipped {sum(r['skipped'] for r in w)}" if any(r["skipped"] for r in w) else ""),
              flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------------
# the run


def run(cfg: TrainConfig) -> Dict:
    """Train (or continue training) to the last step. Returns a summary (step, losses of this invocation)."""
    faults = Faults.from_env()
    env = dist.init(cfg.device, cfg.dist_timeout_s)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    metrics, loader, log = None, None, None
    try:
        if cfg.deterministic:
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be repeatable
            torch.use_deterministic_algorithms(True)
        metrics = build_metrics(cfg.metrics, env.rank, env.local_rank)
        run_dir = Path(cfg.run_dir)
        ckpt_dir = run_dir / cfg.checkpoint.dir
        p = build(cfg, env)
        loader = VideoLoader(cfg.data, grid=cfg.model.grid, rank=env.rank, world_size=env.world_size,
                             on_batch=metrics.loader)
        config = to_dict(cfg)
        step, skipped, n = resume(p, loader, cfg, config)
        last = cfg.schedule.last_step
        dist.print0(f"training {cfg.model.size} on {env.world_size} x {env.device.type} "
                    f"({'bf16 autocast' if p.amp else 'fp32'}), {loader.steps_per_epoch} steps/epoch, "
                    f"steps {step + 1}..{last} of {cfg.schedule.total_steps}; run_dir {run_dir}"
                    + (f"; {n} tensors identical on all ranks" if env.distributed else "")
                    + (f"; metrics on {metrics.url}" if metrics.url else ""))
        log = RunLog(run_dir / "losses.jsonl", cfg.log_every, last, env.world_size, env.is_main)
        t_start, first = time.perf_counter(), step
        losses: List[float] = []

        it = iter(loader)
        while step < last:
            t0 = time.perf_counter()
            batch = next(it)
            wait = time.perf_counter() - t0
            faults.maybe_kill(env.rank, step + 1)
            out = train_step(p, batch, step + 1, faults.nan_at(env.rank, step + 1))
            step += 1
            if out.nonfinite:
                metrics.nonfinite(step, cfg.nonfinite)
                if cfg.nonfinite == "stop":
                    raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss {out.loss}, grad "
                                         f"norm {out.grad_norm}); weights left as after step {step - 1}. "
                                         "Set nonfinite=skip to skip such steps.")
                dist.print0(f"warning: non-finite loss or gradient at step {step}: update skipped")
                skipped += 1
            dt = time.perf_counter() - t0
            clips = int(batch.clips.size(0))
            metrics.step(StepStats(step, dt, wait, clips, out.loss, out.lr, out.weight_decay, out.ema,
                                   out.grad_norm, skipped=out.nonfinite))
            log.step({"step": step, "loss": out.loss, "lr": out.lr, "weight_decay": out.weight_decay,
                      "ema": out.ema, "grad_norm": out.grad_norm, "step_s": dt, "data_s": wait, "clips": clips,
                      "epoch": batch.epoch, "skipped": out.nonfinite})
            losses.append(out.loss)
            if step % cfg.checkpoint.every_steps == 0 or step == last:
                if step == last:  # diverged ranks must not be saved as a finished run
                    dist.assert_same_across_ranks(_weights(p.model))
                if env.is_main:
                    t_ck = time.perf_counter()
                    checkpoint.save(ckpt_dir, step, checkpoint_state(p, loader, step, skipped, config),
                                    cfg.checkpoint.keep_last, kill_midway=faults.kill_in_ckpt == step)
                    metrics.checkpoint(step, time.perf_counter() - t_ck)

        dist.barrier()  # no rank reports success before the final checkpoint exists
        seconds = time.perf_counter() - t_start
        if env.is_main:
            log.close()
            plot_losses(run_dir / "losses.jsonl", run_dir / "loss.png", f"{run_dir}: {cfg.model.size}, step {step}")
        dist.print0(f"done: step {step}, {step - first} steps in {seconds:.1f} s, {skipped} skipped"
                    + (f"; parameters identical on all {env.world_size} ranks" if env.distributed else ""))
        return {"step": step, "first_step": first, "skipped_steps": skipped, "losses": losses,
                "seconds": seconds, "run_dir": str(run_dir)}
    finally:
        if log is not None:
            log.close()
        if loader is not None:
            loader.close()
        if metrics is not None:
            metrics.close()
        torch.use_deterministic_algorithms(was_deterministic)
        dist.cleanup()


def _weights(model: VJEPA):
    for part in ("encoder", "predictor", "target_encoder"):
        for name, t in getattr(model, part).named_parameters():
            yield f"{part}.{name}", t


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.trainer", description="V-JEPA pretraining.",
                                     epilog="Overrides: key=value, e.g. optim.lr=3e-4 data.batch_size=4 "
                                            "(schema: train/config.py).")
    parser.add_argument("--config", help="YAML file (e.g. configs/train/cpu.yaml); default: the schema defaults")
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ValueError as e:  # ConfigError, and ModelConfig's own checks
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
