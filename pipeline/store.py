"""Reading sample members out of shards, local or remote (remote shards are cached locally, whole)."""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections import OrderedDict
from typing import Optional

from common.files import atomic_path, is_local, url_to_fs
from shards.manifest import ManifestError, safe_name


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tubelet", "shards")


class ShardStore:
    """Random access to tar members by (shard, offset, size), with the tar header checked on every read.

    Local shards are read in place with pread; remote ones (any fsspec URL) are downloaded once into
    `cache_dir` (atomically, size-checked) and read from there.
    """

    def __init__(self, root: str, cache_dir: str = "", max_open: int = 64):
        self.root = root.rstrip("/")
        self.fs, self.path = url_to_fs(self.root)
        self.local = is_local(self.fs)
        tag = hashlib.sha1(self.root.encode()).hexdigest()[:16]
        self.cache = os.path.join(cache_dir or default_cache_dir(), tag)
        self._files: "OrderedDict[str, int]" = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _local_path(self, shard: str, expected_size: Optional[int]) -> str:
        safe_name(shard, self.root)  # a shard name never leads outside the set or the cache
        if self.local:
            return os.path.join(self.path, shard)
        dst = os.path.join(self.cache, shard)
        if not (os.path.exists(dst) and (expected_size is None or os.path.getsize(dst) == expected_size)):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with atomic_path(dst) as tmp:
                self.fs.get_file(f"{self.path}/{shard}", tmp)
                if expected_size is not None and os.path.getsize(tmp) != expected_size:
                    raise ManifestError(f"shard {shard} downloaded from {self.root} has the wrong size")
        return dst

    def _fd(self, shard: str, expected_size: Optional[int]) -> int:
        with self._lock:
            fd = self._files.get(shard)
            if fd is not None:
                self._files.move_to_end(shard)
                return fd
            fd = os.open(self._local_path(shard, expected_size), os.O_RDONLY)
            self._files[shard] = fd
            while len(self._files) > self._max_open:
                os.close(self._files.popitem(last=False)[1])
            return fd

    def read(self, shard: str, offset: int, size: int, name: str, shard_size: Optional[int] = None) -> bytes:
        """The data of member `name`; its tar header must precede it (else the shard does not match)."""
        fd = self._fd(shard, shard_size)
        blob = os.pread(fd, size + tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
        header = blob[:100].rstrip(b"\0").decode(errors="replace")
        if header != name or len(blob) != size + tarfile.BLOCKSIZE:
            raise ManifestError(f"shard {shard}: expected member {name} at offset {offset}, found "
                                f"{header[:60]!r}; the shard does not match its manifest (rebuild it with "
                                "`make shards`)")
        self.bytes_read += size
        return blob[tarfile.BLOCKSIZE:]

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()
