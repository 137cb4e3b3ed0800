"""Atomic training checkpoints: `ckpt-{step:08d}.pt` in one folder, the newest complete one is the resume point.

A checkpoint is a plain dict of named parts, loadable with `torch.load(weights_only=True)` (tensors and plain
containers only, never code):

    step, skipped_steps       ints: updates done, of which skipped by the NaN guard
    encoder, predictor, target_encoder   state_dicts (the target encoder is what `model.features` loads)
    optimizer                 AdamW state_dict (moments, step counts, param groups)
    loader                    VideoLoader.state_dict(): (epoch, position) of the next batch, same on every rank
    rng                       torch CPU (and CUDA) generator states; nothing in the step draws from them (crops
                              and masks are pure functions of the loader state), kept so that stays true
    config                    the resolved TrainConfig as a plain dict

Writing: rank 0 only; torch.save to a temp file in the same folder, flush, fsync, os.replace, fsync the folder,
so a file under the final name is always complete. Reading: newest first; a file that fails to load is
reported and the next older one is tried. Unreadable files are never a reason to start again from step 0.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.errors import CheckpointError
from shards.manifest import fsync_dir

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


def save_atomic(path: str | Path, obj: Any, kill_midway: bool = False) -> Path:
    """torch.save `obj` so that `path` is either absent or complete: temp file in the same folder, flush,
    fsync, os.replace, fsync the folder.

    kill_midway: fault injection (TUBELET_FAULT_KILL_IN_CKPT), SIGKILL this process after half of the
    temp file is written and synced, as a node failure or OOM kill would.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            if kill_midway:
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getbuffer()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(str(final.parent))
    return final


def save(folder: str | Path, step: int, state: Dict[str, Any], keep_last: int = 0,
         kill_midway: bool = False) -> Path:
    """Write `state` as the checkpoint of `step` atomically; then delete all but the newest `keep_last`."""
    final = save_atomic(path_for(folder, step), state, kill_midway)
    _remove_stale(Path(folder), keep_last)
    return final


def _remove_stale(folder: Path, keep_last: int) -> None:
    """Old checkpoints beyond keep_last, and temp files of writers that died (this process writes no other)."""
    if keep_last > 0:
        for _, p in list_checkpoints(folder)[keep_last:]:
            p.unlink(missing_ok=True)
    for p in folder.iterdir():
        if p.name.startswith(".ckpt-") and p.name.endswith(TMP_SUFFIX):
            p.unlink(missing_ok=True)


def load(path: str | Path) -> Dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a tubelet training checkpoint (no 'step')")
    return state


def load_latest(folder: str | Path, log=None) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint that loads, with its contents; None when the folder holds none.

    A file that fails to load is reported through `log` (default: stderr) and the next older one is used.
    Raises CheckpointError when checkpoints exist but none loads: starting over would silently discard them.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    found = list_checkpoints(folder)
    errors = []
    for step, path in found:
        try:
            state = load(path)
        except Exception as e:  # any read or unpickling error: this file is not usable, try the previous one
            errors.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"warning: checkpoint {path} does not load ({errors[-1]}); trying an older one")
            continue
        if state["step"] != step:
            errors.append(f"{path.name}: holds step {state['step']}")
            log(f"warning: checkpoint {path} holds step {state['step']}, not {step}; trying an older one")
            continue
        return path, state
    if found:
        raise CheckpointError(f"{len(found)} checkpoint(s) in {folder} but none loads: " + "; ".join(errors)
                              + ". Refusing to start again from step 0: move them away to do that.")
    return None

