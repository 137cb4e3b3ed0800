"""The output folder of a `make shards` run (local or any fsspec URL): its lock, its temp space, atomic puts."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Optional

from common.files import atomic_write, is_local, join, publish, url_to_fs
from shards.plan import PARTS


class ShardsError(RuntimeError):
    """The run cannot go on (locked output, config mismatch, missing partitions); the message says why."""


class Output:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = url_to_fs(self.url)
        self.local = is_local(self.fs)
        self.fs.makedirs(join(self.path, PARTS), exist_ok=True)
        self._lock_fd: Optional[int] = None
        self._lock_name: Optional[str] = None

    def url_of(self, name: str) -> str:
        """Where `name` (relative to the set) lives: a local path or a URL."""
        return join(self.path if self.local else self.url, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(join(self.path, name))

    def read_json(self, name: str) -> dict:
        with self.fs.open(join(self.path, name), "r") as f:
            return json.load(f)

    def put(self, name: str, src_local: str) -> None:
        """Give a finished local file its final name in the output; readers never see it partial."""
        publish(src_local, self.url_of(name))

    def write(self, name: str, data: bytes, tmpdir: str) -> None:
        atomic_write(self.url_of(name), data, tmp_dir=tmpdir)

    def tmpdir(self, owner: str) -> str:
        """Where shards are assembled: inside the output (same filesystem, so rename is atomic) if local.

        Emptied first: what a killed run left there was never given a final name, so nothing reads it.
        """
        if not self.local:
            return tempfile.mkdtemp(prefix="tubelet-shards-")
        d = join(self.path, f".tmp-{owner}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def lock(self, what: str) -> None:
        """Refuse a second run into the same output (per partition) while one is running."""
        name = f".lock-{what}"
        info = f"host={socket.gethostname()} pid={os.getpid()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}"
        if self.local:
            fd = os.open(join(self.path, name), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even on kill -9
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise ShardsError(f"another `make shards` is writing {self.url} ({holder}); wait for it to "
                                  "finish, or use another output folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            self._lock_fd = fd
        else:
            if self.exists(name):
                with self.fs.open(join(self.path, name), "r") as f:
                    holder = f.read().strip()
                raise ShardsError(f"{self.url} is locked by another `make shards` ({holder}); if no job is "
                                  f"running (it was killed), delete {self.url}/{name} and start again")
            with self.fs.open(join(self.path, name), "w") as f:
                f.write(info)
            self._lock_name = name

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        elif self._lock_name:
            self.fs.rm(join(self.path, self._lock_name))
            self._lock_name = None
