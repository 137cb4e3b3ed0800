"""Atomic training checkpoints, `ckpt-{step:08d}.pt` in one folder, and resuming a run from the newest complete one.

A checkpoint is a plain dict of named parts, loadable with `torch.load(weights_only=True)` (tensors and plain
containers only, never code):

    step, skipped_steps       ints: updates done, of which skipped by the NaN guard
    encoder, predictor, target_encoder   state_dicts (the target encoder is what `model.features` loads)
    optimizer                 AdamW state_dict (moments, step counts, param groups)
    loader                    VideoLoader.state_dict(): (epoch, position) of the next batch, same on every rank
    rng                       torch CPU (and CUDA) generator states; nothing in the step draws from them (crops
                              and masks are pure functions of the loader state), kept so that stays true
    config                    the resolved TrainConfig as a plain dict

Writing: rank 0 only, with `common.torch_file.write_torch_file` (a temp file in the same folder, flush, fsync,
os.replace, fsync the folder), so a file under the final name is always complete. Reading: newest first, every file CRC-checked before it is
unpickled (`common.torch_file`); a file that fails is reported and the next older one is tried. Damaged files
are never a reason to start again from step 0, and never count towards `keep_last`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from common.torch_file import CheckpointError, is_intact, read_torch_file, write_torch_file
from train import dist

if TYPE_CHECKING:
    from pipeline.loader import VideoLoader
    from train.step import Parts

_log = logging.getLogger(__name__)
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
TMP_SUFFIX = ".tmp"


def path_for(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> List[Tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `folder`, newest first (temp files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := NAME.match(p))]
    return sorted(found, reverse=True)


def save(folder: str | Path, step: int, state: Dict[str, Any], keep_last: int = 0,
         kill_midway: bool = False) -> Path:
    """Write `state` as the checkpoint of `step` atomically; then delete what retention no longer needs."""
    final = write_torch_file(path_for(folder, step), state, kill_midway)
    _remove_stale(Path(folder), keep_last)
    return final


class BackgroundSaver:
    """Checkpoints written by a thread while training goes on (rank 0).

    `save` copies the state to host memory, which is all the training loop waits for (a device-to-host copy into
    pinned buffers kept from one checkpoint to the next; a copy in memory on the CPU), and returns; the thread
    then writes it with `save` (atomic, then retention) and reports `on_done(step, paused_seconds, write_seconds)`. One write at
    a time: a `save` while the previous write is still going waits for it. A write's error is raised by the next
    `save` or by `wait`, which the trainer calls before it reports a run finished.
    """

    def __init__(self, folder: str | Path, keep_last: int, on_done=None):
        self.folder, self.keep_last, self.on_done = Path(folder), keep_last, on_done
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._pinned: Dict[str, torch.Tensor] = {}
        self._devices: set = set()

    def save(self, step: int, state: Dict[str, Any], kill_midway: bool = False) -> float:
        """Start writing the checkpoint of `step`; returns the seconds training was paused (wait + copy)."""
        t0 = time.perf_counter()
        self.wait()
        self._devices: set = set()
        host = self._to_host(state, "")
        for dev in self._devices:
            torch.cuda.synchronize(dev)  # the non-blocking copies have landed
        paused = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(step, host, kill_midway, paused),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return paused

    def wait(self) -> None:
        """Until the write in flight (if any) is on disk; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """`wait`, logging a write's error instead of raising it (for exits on another error)."""
        try:
            self.wait()
        except BaseException as e:
            _log.error(f"checkpoint write failed: {e}")

    def _write(self, step: int, state: Dict[str, Any], kill_midway: bool, paused: float) -> None:
        t0 = time.perf_counter()
        try:
            save(self.folder, step, state, self.keep_last, kill_midway)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e
            return
        if self.on_done is not None:
            self.on_done(step, paused, time.perf_counter() - t0)

    def _to_host(self, obj: Any, key: str) -> Any:
        """A copy of `obj` that training cannot change: tensors on the host, containers rebuilt."""
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type != "cuda":
                return t.clone()
            self._devices.add(t.device)
            buf = self._pinned.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return buf.copy_(t, non_blocking=True)
        if isinstance(obj, dict):
            return {k: self._to_host(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_host(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj  # ints, floats, strings, None: immutable


def _remove_stale(folder: Path, keep_last: int) -> None:
    """Checkpoints older than the newest `keep_last` that are intact (a damaged one never counts: deleting good
    ones for it would leave nothing to resume from), and temp files of writers that died."""
    if keep_last > 0:
        good = 0
        for _, p in list_checkpoints(folder):
            if good >= keep_last:
                p.unlink(missing_ok=True)
            elif is_intact(p):
                good += 1
    for p in folder.iterdir():
        if p.name.startswith(".ckpt-") and p.name.endswith(TMP_SUFFIX):
            p.unlink(missing_ok=True)


def check_folder(folder: str | Path) -> None:
    """Make sure checkpoints can be written to `folder` before any work is done (rank 0, at start)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"checkpoint folder {folder} is (or lies under) a file, not a folder; move it away "
                              "or set checkpoint.dir") from None
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {folder}: {e.strerror or e}; fix its permissions or set "
                              "checkpoint.dir") from None


def load(path: str | Path) -> Dict[str, Any]:
    """A training checkpoint's parts, CRC-checked before anything is unpickled."""
    state = read_torch_file(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a tubelet training checkpoint (no 'step')")
    return state


def load_latest(folder: str | Path, log=None) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint that loads, with its contents; None when the folder holds none.

    A file that fails to load is reported through `log` (default: a warning in the log) and the next older one
    is used.
    Raises CheckpointError when checkpoints exist but none loads: starting over would silently discard them.
    """
    log = log or _log.warning
    found = list_checkpoints(folder)
    errors = []
    for step, path in found:
        try:
            state = load(path)
        except Exception as e:  # any read or unpickling error: this file is not usable, try the previous one
            errors.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"checkpoint {path} does not load ({errors[-1]}); trying an older one")
            continue
        if state["step"] != step:
            errors.append(f"{path.name}: holds step {state['step']}")
            log(f"checkpoint {path} holds step {state['step']}, not {step}; trying an older one")
            continue
        return path, state
    if found:
        raise CheckpointError(f"{len(found)} checkpoint(s) in {folder} but none loads: " + "; ".join(errors)
                              + ". Refusing to start again from step 0: move them away to do that.")
    return None


# ----------------------------------------------------------------------------------------------------
# resuming a run: the trainer's parts <-> a checkpoint's named parts


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
    for group in p.optimizer.param_groups:  # the saved groups' fused/foreach flags would replace this build's
        group.update({k: p.optimizer.defaults[k] for k in ("fused", "foreach")})
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and p.env.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], p.env.device)
    return int(state["step"]), int(state.get("skipped_steps", 0))


def find_resume_point(ckpt_dir: Path, env: dist.DistEnv) -> Optional[dict]:
    """Rank 0 picks the newest loadable checkpoint (falling back past damaged ones, loudly); every rank
    then loads that same file. None: a fresh run."""
    found = dist.on_rank0(lambda: load_latest(ckpt_dir))
    step = dist.broadcast_int(found[1]["step"] if found else 0, env.device)
    if step == 0:
        return None
    if found is not None:
        _log.info(f"resuming from {found[0]} (step {step})")
        return found[1]
    return load(path_for(ckpt_dir, step))


def resume(p: Parts, loader: VideoLoader, ckpt_dir: Path, config: dict) -> Tuple[int, int]:
    """Restore the newest loadable checkpoint of `ckpt_dir` into the parts and the loader, if there is one.
    Returns (step, skipped_steps): (0, 0) for a fresh run."""
    state = find_resume_point(ckpt_dir, p.env)
    if state is None:
        return 0, 0
    changed = config_changes(state["config"], config)
    if changed:
        _log.info("note: config differs from the checkpoint's: " + "; ".join(changed))
    return restore(p, loader, state)


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
