"""The output folder of a `make shards` run (local or any fsspec URL): its lock, its temp space, atomic puts."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import socket
import tempfile
import time
from typing import List, Optional

from common.files import Locked, atomic_write, is_local, join, lock_file, publish, unlock_file, url_to_fs
from common.retry import RetryPolicy
from shards.plan import PARTS


class ShardsError(RuntimeError):
    """The run cannot go on (locked output, config mismatch, missing partitions); the message says why."""


class Output:
    def __init__(self, url: str, retry: Optional[RetryPolicy] = None):
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.fs, self.path = url_to_fs(self.url)
        self.local = is_local(self.fs)
        try:
            self.fs.makedirs(join(self.path, PARTS), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ShardsError(f"output {self.url} is (or lies under) a file, not a folder; choose another output") from None
        except PermissionError as e:
            raise ShardsError(f"cannot create the output folder {self.url}: {e.strerror or e}") from None
        self._lock_fd: Optional[int] = None
        self._lock_name: Optional[str] = None

    def url_of(self, name: str) -> str:
        """Where `name` (relative to the set) lives: a local path or a URL."""
        return join(self.path if self.local else self.url, name)

    def _call(self, fn, what: str, name: str):
        """A storage call on `name`, retried on transient errors (an object store's 5xx, a reset)."""
        return self.retry.call(fn, f"{what} {self.url_of(name)}")

    def exists(self, name: str) -> bool:
        return self._call(lambda: self.fs.exists(join(self.path, name)), "checking", name)

    def list_names(self, folder: str) -> List[str]:
        """The file names in `folder` of the output (one listing; [] when it does not exist)."""
        def names():
            path = join(self.path, folder)
            if not self.fs.exists(path):
                return []
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        return self._call(names, "listing", folder)

    def read_json(self, name: str) -> dict:
        def read():
            with self.fs.open(join(self.path, name), "r") as f:
                return json.load(f)
        return self._call(read, "reading", name)

    def remove(self, name: str) -> None:
        self._call(lambda: self.fs.rm(join(self.path, name)), "removing", name)

    def log_path(self, name: str) -> str:
        """Where this run's log file is written: in the set, or a local temp file for a remote set."""
        if self.local:
            return join(self.path, name)
        fd, tmp = tempfile.mkstemp(prefix="tubelet-shards-", suffix=".log")
        os.close(fd)
        return tmp

    def keep_log(self, path: str, name: str) -> None:
        """Put a remote set's log file next to its manifest (a local set's is already there)."""
        if not self.local and os.path.exists(path):
            self.put(name, path)

    def put(self, name: str, src_local: str) -> None:
        """Give a finished local file its final name in the output; readers never see it partial."""
        if self.local:
            publish(src_local, self.url_of(name))
        else:  # an object store's put is all or nothing: retried whole
            self._call(lambda: self.fs.put_file(src_local, join(self.path, name)), "writing", name)
            os.unlink(src_local)

    def write(self, name: str, data: bytes, tmpdir: str) -> None:
        if self.local:
            atomic_write(self.url_of(name), data, tmp_dir=tmpdir)
        else:
            self._call(lambda: self.fs.pipe_file(join(self.path, name), data), "writing", name)

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
        if self.local:
            try:
                self._lock_fd = lock_file(join(self.path, name))
            except Locked as e:
                raise ShardsError(f"another `make shards` is writing {self.url} ({e.holder}); wait for it to "
                                  "finish, or use another output folder") from None
            self._lock_name = name
            return
        if self.exists(name):
            with self.fs.open(join(self.path, name), "r") as f:
                holder = f.read().strip()
            raise ShardsError(f"{self.url} is locked by another `make shards` ({holder}); if no job is "
                              f"running (it was killed), delete {self.url}/{name} and start again")
        holder = f"host={socket.gethostname()} pid={os.getpid()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}"
        self._call(lambda: self.fs.pipe_file(join(self.path, name), holder.encode()), "writing", name)
        self._lock_name = name

    def unlock(self) -> None:
        """Release the lock and remove its file: a finished set holds no lock files."""
        if self._lock_fd is not None:
            unlock_file(self._lock_fd, join(self.path, self._lock_name))
            self._lock_fd = None
        elif self._lock_name:
            name = self._lock_name
            self._call(lambda: self.fs.rm(join(self.path, name)), "removing", name)
        self._lock_name = None
