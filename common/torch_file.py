"""Writing the torch files tubelet keeps (checkpoints, probe caches) atomically, and reading them without ever
using a damaged one.

`write_torch_file` leaves its path either absent or complete (a temp file in the same folder, fsync, rename; a full
disk is a CheckpointError naming the path, the previous file kept).

`torch.save` writes a zip archive whose members carry CRC-32s, but `torch.load` never checks them: a checkpoint
with bytes flipped in the middle loads silently. `read_torch_file` checks every member's CRC first (about 1 GB/s),
then loads with `weights_only=True` (tensors and plain containers, never code). `is_intact` is the same check,
remembered per (path, size, mtime) so retention can ask about the same files at every save.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import signal
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

from common.files import atomic_open

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint (or an encoder export, a probe state) cannot be used: missing, damaged, not tubelet's, or not
    matching its config. Raised by the trainer's resume, the probe and `model.features`; the message names the file."""


def check_crc(path: PathLike) -> None:
    """Raise CheckpointError naming the file and the first damaged member, when the zip's CRCs do not match."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a complete torch file ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged (CRC mismatch in {bad}); it was changed after it was written")


def read_torch_file(path: PathLike, mmap: bool = False) -> Any:
    """The contents of a torch file, CRC-checked first; CPU tensors (memory-mapped with `mmap`)."""
    check_crc(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # an unpickling error: the file is not one tubelet wrote
        raise CheckpointError(f"{path}: cannot be read as a torch file of tensors and plain containers "
                              f"(loaded with weights_only=True): {e}") from None


def is_intact(path: PathLike) -> bool:
    """Whether the file's CRCs match (remembered until the file changes)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _intact(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _intact(path: str, size: int, mtime_ns: int) -> bool:
    try:
        check_crc(path)
        return True
    except (CheckpointError, OSError):
        return False


def write_torch_file(path: PathLike, obj: Any, kill_midway: bool = False) -> Path:
    """torch.save `obj` so that `path` is either absent or complete (`common.files.atomic_open`: temp file in the
    same folder, fsync, rename, fsync the folder). A full disk is a CheckpointError that says so and names the
    path; whatever `path` held before is left as it was.

    kill_midway: fault injection (TUBELET_FAULT_KILL_IN_CKPT), SIGKILL this process after half of the
    temp file is written and synced, as a node failure or OOM kill would.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(final) as f:
            if kill_midway:
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getbuffer()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            raise CheckpointError(f"no space left on device writing {final}; the checkpoints already in "
                                  f"{final.parent} are kept. Free space there (or set checkpoint.dir) and "
                                  "restart: the run resumes from the newest one") from None
        raise
    return final
