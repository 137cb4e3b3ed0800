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

Fault injection for the reliability tests: `train.faults`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from common import logs
from common.cli import main_for
from common.config import to_dict, to_yaml
from common.files import Locked, atomic_write, lock_file, unlock_file
from common.torch_file import CheckpointError
from pipeline.loader import LoaderError, VideoLoader
from shards.manifest import ManifestError
from train import checkpoint, dist
from train.config import TrainConfig
from train.faults import Faults
from train.init_from import initialise
from train.metrics import build_metrics
from train.plots import plot_losses, try_plot
from train.runlog import RunLog, trim_losses
from train.signals import CollapseWatch
from train.step import StepResult, StepStats, attention_backend, build, read_stats, train_step


log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient with nonfinite=stop; the message names the step."""


class RunDirError(RuntimeError):
    """`run_dir` cannot be used (a file, or another trainer is using it); the message says what to do."""


def claim_run_dir(run_dir: Path, ckpt_dir: Path) -> int:
    """Rank 0, before any work: `run_dir` is a folder that no other trainer uses (locked until this run ends) and
    checkpoints can be written to `ckpt_dir`. Returns the lock's file descriptor."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"run_dir {run_dir} is (or lies under) a file, not a folder; set run_dir") from None
    try:
        fd = lock_file(run_dir / ".lock")
    except Locked as e:
        raise RunDirError(f"another trainer is using run_dir {run_dir} ({e.holder}); wait for it to finish, or "
                          "give this run another run_dir") from None
    try:
        checkpoint.check_folder(ckpt_dir)
    except BaseException:
        unlock_file(fd)
        raise
    return fd


@dataclass
class Ran:
    """A step queued on the device, with what the host measured of it (host time: on a GPU it follows the device
    within a step, as the host waits for the device's queue to have room)."""

    step: int
    out: StepResult
    step_s: float
    data_s: float
    clips: int
    epoch: int


def report(pending: List[Ran], cfg: TrainConfig, metrics, runlog: RunLog, watch: CollapseWatch,
           losses: List[float]) -> int:
    """Read the pending steps' outcomes from the device (one sync) and report them in order: metrics, losses.jsonl,
    the log. Returns how many were skipped. With nonfinite=stop, raises NonFiniteError at the first non-finite
    step, after reporting the steps before it (the device skipped it and every step after it)."""
    skipped = 0
    for ran, (loss, norm, bad) in zip(pending, read_stats([r.out for r in pending])):
        out = ran.out
        if bad:
            metrics.nonfinite(ran.step, cfg.nonfinite)
            if cfg.nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss or gradient at step {ran.step} (loss {loss}, grad norm "
                                     f"{norm}); weights left as after step {ran.step - 1}. Set nonfinite=skip to "
                                     "skip such steps.")
            if dist.rank() == 0:
                log.warning(f"non-finite loss or gradient at step {ran.step}: update skipped")
            skipped += 1
        metrics.step(StepStats(ran.step, ran.step_s, ran.data_s, ran.clips, loss, out.lr, out.weight_decay, out.ema,
                               norm, skipped=bad))
        if out.signals:
            metrics.signals(out.signals)
            watch.update(ran.step, out.signals)
        runlog.step({"step": ran.step, "loss": loss, "lr": out.lr, "weight_decay": out.weight_decay, "ema": out.ema,
                     "grad_norm": norm, "step_s": ran.step_s, "data_s": ran.data_s, "clips": ran.clips,
                     "epoch": ran.epoch, "skipped": bad, **(out.signals or {})})
        losses.append(loss)
    pending.clear()
    return skipped


def exit_on_sigterm(stack: contextlib.ExitStack) -> None:
    """SIGTERM (torchrun stopping the workers after a peer died, SLURM at the time limit, preemption) raises
    SystemExit, so the run's `finally` lets a checkpoint write in flight land instead of dying halfway through it.
    Restored when `stack` closes."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, terminate))


def run(cfg: TrainConfig) -> Dict:
    """Train (or continue training) to the last step. Returns a summary (step, losses of this invocation)."""
    faults = Faults.from_env()
    env = dist.init(cfg.device, cfg.dist_timeout_s)
    logs.console(env.rank)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / cfg.checkpoint.dir
    # every resource is registered as it is made and released in reverse order, on success and on error: the
    # checkpoint write in flight lands first, the metrics' final scrape and the run_dir lock come last
    with contextlib.ExitStack() as stack:
        stack.callback(dist.cleanup)
        stack.callback(torch.use_deterministic_algorithms, torch.are_deterministic_algorithms_enabled())
        exit_on_sigterm(stack)
        lock = dist.on_rank0(lambda: claim_run_dir(run_dir, ckpt_dir))
        if lock is not None:
            stack.callback(unlock_file, lock, run_dir / ".lock")
        # rank 0 logs everything to train.log; the other ranks their warnings to train-rank<r>.log
        stack.enter_context(logs.to_file(run_dir / ("train.log" if env.is_main else f"train-rank{env.rank}.log"),
                                         env.rank, logging.INFO if env.is_main else logging.WARNING))
        if cfg.deterministic:
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be repeatable
            torch.use_deterministic_algorithms(True)
        metrics = build_metrics(cfg.metrics, env.rank, env.local_rank, run=run_dir.resolve().name)
        stack.callback(metrics.close)
        p = build(cfg, env)
        loader = VideoLoader(cfg.data, grid=cfg.model.grid, **env.placement(), on_batch=metrics.loader)
        stack.callback(loader.close)
        config = to_dict(cfg)
        step, skipped = checkpoint.resume(p, loader, ckpt_dir, config)
        if step == 0 and cfg.init_from:  # a new run from given weights; a resume keeps its own
            initialise(p.model, cfg.model, cfg.init_from)
        n = dist.assert_same_across_ranks(p.named_weights())
        if env.is_main:
            atomic_write(run_dir / "config.yaml", to_yaml(cfg))
            trim_losses(run_dir / "losses.jsonl", step)
        last = cfg.schedule.last_step
        metrics.started(step, step, cfg.dist_timeout_s)  # resumed from the checkpoint of `step` (0: none)
        log.info(f"training {cfg.model.size} on {env.world_size} x {env.device.type} "
                 f"({'bf16 autocast' if p.amp else 'fp32'}, attention {attention_backend(cfg, env.device, p.amp)}, "
                 f"{'fused' if p.fused else 'foreach'} AdamW{', compiled' if cfg.compile else ''}"
                 f"{', activation checkpointing' if cfg.model.activation_checkpointing else ''}), "
                 f"{loader.steps_per_epoch} steps/epoch, "
                 f"steps {step + 1}..{last} of {cfg.schedule.total_steps}; run_dir {run_dir}"
                 + (f"; {n} tensors identical on all ranks" if env.distributed else "")
                 + (f"; metrics on {metrics.url}" if metrics.url else ""))
        runlog = RunLog(run_dir / "losses.jsonl", cfg.log_every, last, env.world_size, env.is_main,
                        unit="images" if cfg.model.num_frames == 1 else "clips")
        stack.callback(runlog.close)
        t_start, first = time.perf_counter(), step
        losses: List[float] = []

        watch = CollapseWatch(enabled=env.is_main)

        def saved(at: int, paused: float, write_s: float) -> None:  # from the writing thread
            metrics.checkpoint(at, write_s)
            log.info(f"checkpoint {at}: training paused {paused:.2f} s to copy it, written in {write_s:.1f} s "
                     "while training went on")

        saver = checkpoint.BackgroundSaver(ckpt_dir, cfg.checkpoint.keep_last, saved)
        stack.callback(saver.close)  # a write in flight lands (and is reported) even when the run stops with an error
        pending: List[Ran] = []  # steps queued on the device whose outcome the host has not read yet
        it = iter(loader)
        while step < last:
            t0 = time.perf_counter()
            batch = next(it)
            faults.delay_batch()
            wait = time.perf_counter() - t0
            faults.maybe_kill(env.rank, step + 1)
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == last  # the steps that get collapse signals
            out = train_step(p, batch, step + 1, faults.nan_at(env.rank, step + 1), signals=logged)
            step += 1
            if step == first + 1 and cfg.compile:
                log.info(f"first step {time.perf_counter() - t0:.1f} s, torch.compile included")
            pending.append(Ran(step, out, time.perf_counter() - t0, wait, int(batch.clips.size(0)), batch.epoch))
            saving = step % cfg.checkpoint.every_steps == 0 or step == last
            if logged or saving:  # read the steps' outcomes: the one wait for the device in log_every steps
                skipped += report(pending, cfg, metrics, runlog, watch, losses)
            if saving:  # every step before it has been checked: a checkpoint never holds a non-finite update
                if step == last:  # diverged ranks must not be saved as a finished run
                    dist.assert_same_across_ranks(p.named_weights())
                if env.is_main:
                    saver.save(step, checkpoint.checkpoint_state(p, loader, step, skipped, config),
                               kill_midway=faults.kill_in_ckpt == step)
        saver.wait()  # the last checkpoint is on disk

        dist.barrier()  # no rank reports success before the final checkpoint exists
        seconds = time.perf_counter() - t_start
        if env.is_main:
            runlog.close()
            drawn = try_plot(plot_losses, run_dir / "losses.jsonl", run_dir / "loss.png",
                             f"{run_dir}: {cfg.model.size}, step {step}", objective=objective_name(cfg))
        log.info(f"done: step {step}, {step - first} steps in {seconds:.1f} s, {skipped} skipped"
                 + (f"; parameters identical on all {env.world_size} ranks" if env.distributed else ""))
        if env.is_main:
            log.info(where_results_are(cfg, run_dir, checkpoint.path_for(ckpt_dir, step), drawn is not None))
        return {"step": step, "first_step": first, "skipped_steps": skipped, "losses": losses,
                "seconds": seconds, "run_dir": str(run_dir)}


def objective_name(cfg: TrainConfig) -> str:
    """What the loss is, as the plot says it: I-JEPA's smooth L1 on images, V-JEPA's L1 on video."""
    method = "I-JEPA" if cfg.model.num_frames == 1 else "V-JEPA"
    return f"{method} {'smooth L1' if cfg.model.loss == 'smooth_l1' else 'L1'} loss"


def where_results_are(cfg: TrainConfig, run_dir: Path, last_checkpoint: Path, drawn: bool = True) -> str:
    """The end of a run, for whoever ran it: what it wrote, and the next command to try."""
    head = " head=linear" if cfg.model.num_frames == 1 else ""
    return (f"results in {run_dir}/: {'loss.png (the loss and the collapse signals), ' if drawn else ''}"
            f"losses.jsonl, train.log, config.yaml; last checkpoint {last_checkpoint}. Next: evaluate it with a frozen probe, "
            f"`make probe ARGS=\"checkpoint={last_checkpoint} data.root={cfg.data.root}{head}\"`, or train longer "
            f"by rerunning with a larger schedule.total_steps (it resumes)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(TrainConfig, run, argv, prog="tubelet-train", doc=__doc__,
                    errors={NonFiniteError: 1, RunDirError: 2, CheckpointError: 2, ManifestError: 2, LoaderError: 2,
                            dist.DistError: 2})


if __name__ == "__main__":
    sys.exit(main())
