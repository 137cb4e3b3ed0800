"""Files and URLs: atomic writes, hashes, and the few fsspec helpers every stage uses.

Atomic: a reader of the final name never sees a partial file. Locally: write a temp file in the same folder,
flush, fsync, rename over the final name, fsync the folder (so the rename survives a power loss). On an object
store (any fsspec URL that is not a local path): write a local temp file, then one put, which object stores make
visible all at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Tuple, Union

import fsspec

PathLike = Union[str, Path]


def url_to_fs(url: PathLike) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(str(url))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol


def join(root: str, name: str) -> str:
    """`name` inside `root`, a local folder or a URL."""
    return posixpath.join(root, name) if "://" in root else os.path.join(root, name)


def fsync_dir(path: PathLike) -> None:
    """Make the entries of folder `path` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: PathLike, target: PathLike) -> None:
    """Give the finished local file `tmp` the name `target` (a local path or a URL), atomically; `tmp` is gone
    afterwards. Locally `tmp` must be on the target's filesystem (the same folder is safest)."""
    fs, path = url_to_fs(target)
    if not is_local(fs):
        fs.put_file(str(tmp), path)  # an object store's put is all or nothing
        os.unlink(tmp)
        return
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; what tubelet writes is for every reader
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def temp_path(target: PathLike, tmp_dir: Optional[PathLike] = None) -> str:
    """A new empty temp file for `target`: in `tmp_dir`, else beside a local target, else in the system's temp
    folder. Named `.<name>.<random>.tmp`, so listings of final names never include it."""
    fs, path = url_to_fs(target)
    folder = tmp_dir or (os.path.dirname(os.path.abspath(path)) if is_local(fs) else None)
    fd, tmp = tempfile.mkstemp(prefix=f".{posixpath.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(target: PathLike, tmp_dir: Optional[PathLike] = None) -> Iterator[str]:
    """`with atomic_path(target) as tmp: save(tmp)`, for writers that take a path (an encoder, a library's save,
    a download): `target` appears complete when the block ends without an exception, and is left as it was
    otherwise. `target` is a local path or any fsspec URL."""
    tmp = temp_path(target, tmp_dir)
    try:
        yield tmp
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(target: PathLike, mode: str = "wb", tmp_dir: Optional[PathLike] = None) -> Iterator[BinaryIO]:
    """`with atomic_open(target) as f: f.write(...)`: as `atomic_path`, for writers that take a file."""
    with atomic_path(target, tmp_dir) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write(target: PathLike, data: Union[bytes, str], tmp_dir: Optional[PathLike] = None) -> None:
    """Write `data` (bytes, or text as UTF-8) to `target` atomically (see `atomic_open`)."""
    with atomic_open(target, "wb", tmp_dir) as f:
        f.write(data.encode() if isinstance(data, str) else data)


class Locked(RuntimeError):
    """Another process holds the lock; `holder` says who (host, pid, start time)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


def lock_file(path: PathLike) -> int:
    """Take an exclusive lock on the local file `path` (created if absent) and write this process's host, pid and
    start time into it; returns the file descriptor: `unlock_file` it to release (the kernel releases it when the
    process dies, even by kill -9). Raises Locked when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Locked(str(path), holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}"
              .encode(), 0)
    return fd


def unlock_file(fd: int, path: Optional[PathLike] = None) -> None:
    """Release a `lock_file` lock; with `path`, also remove the lock file (while still holding it)."""
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    os.close(fd)


def sha256_file(src: Union[PathLike, BinaryIO], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, given its path or an open binary file (read from its current position)."""
    if isinstance(src, (str, Path)):
        with open(src, "rb") as f:
            return sha256_file(f, chunk)
    h = hashlib.sha256()
    for block in iter(lambda: src.read(chunk), b""):
        h.update(block)
    return h.hexdigest()
