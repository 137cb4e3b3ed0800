"""Reading sample members out of shards, local or remote (remote shards through the node's bounded cache)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from common.files import is_local, sha256_file, url_to_fs
from common.retry import RetryPolicy
from pipeline.cache import CacheStats, ShardCache, needed_shards
from shards.manifest import ManifestError, safe_name

DEFAULT_CACHE_MAX_BYTES = 100 * 2**30  # or half the free space of the cache's disk, whichever is less


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tubelet", "shards")


def cache_folder(root: str, cache_dir: str = "") -> str:
    """The node's cache folder of the remote set `root` (one per set URL, shared by the node's processes)."""
    tag = hashlib.sha1(root.rstrip("/").encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or default_cache_dir(), tag)
    os.makedirs(folder, exist_ok=True)
    return folder


class ShardStore:
    """Random access to tar members by (shard, offset, size), with the tar header checked on every read.

    Local shards are read in place with pread (file descriptors kept open, LRU). Remote ones (any fsspec URL) are
    read from the node's `ShardCache` in `cache_dir`, bounded by `cache_max_bytes` (0: the default), opened per
    read so an evicted shard frees its space at once; `prefetch` downloads what the plan reads next.

    Checked where read: the first time this process reads a shard, its size must be the manifest's (and its sha256
    too with `verify_hashes`), else one ManifestError names the shard and the fix; no shard is listed or parsed
    at start (the set was verified when written; `tubelet-verify` checks all of it).
    """

    def __init__(self, root: str, cache_dir: str = "", max_open: int = 64, cache_max_bytes: int = 0,
                 retry: Optional[RetryPolicy] = None, download_threads: int = 8, verify_hashes: bool = False):
        self.root = root.rstrip("/")
        self.fs, self.path = url_to_fs(self.root)
        self.local = is_local(self.fs)
        self._files: "OrderedDict[str, int]" = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.verify_hashes = verify_hashes
        self._checked: set = set()  # shards whose size (and hash) this process has checked
        self.cache: Optional[ShardCache] = None
        if not self.local:
            folder = cache_folder(self.root, cache_dir)
            limit = cache_max_bytes or min(DEFAULT_CACHE_MAX_BYTES, shutil.disk_usage(folder).free // 2)
            self.cache = ShardCache(self.fs, self.path, folder, limit, retry or RetryPolicy(), download_threads)

    @property
    def cache_stats(self) -> Optional[CacheStats]:
        return None if self.cache is None else self.cache.stats.snapshot()

    def prefetch(self, now: List[int], ahead: List[int], shards: Sequence[str], shard_bytes: Dict[str, int]) -> None:
        """Remote sets: keep the shards of rows `now` (read next), and download those of `ahead` (the plan's
        later reads, in order) while they fit."""
        if self.cache is not None:
            current = needed_shards(now, shards, shard_bytes)
            self.cache.prefetch(current + needed_shards(ahead, shards, shard_bytes), now=len(current))

    def _fd(self, shard: str) -> int:
        safe_name(shard, self.root)  # a shard name never leads outside the set or the cache
        with self._lock:
            fd = self._files.get(shard)
            if fd is not None:
                self._files.move_to_end(shard)
                return fd
            fd = os.open(os.path.join(self.path, shard), os.O_RDONLY)
            self._files[shard] = fd
            while len(self._files) > self._max_open:
                os.close(self._files.popitem(last=False)[1])
            return fd

    def _check(self, shard: str, fd: int, shard_size: Optional[int], sha256: Optional[str]) -> None:
        """A shard's first read in this process: its size (and sha256 with verify_hashes) against the manifest."""
        if shard in self._checked:
            return
        fix = (f"check the set with `tubelet-verify root={self.root}` and rebuild damaged shards with "
               "`make shards`")
        got = os.fstat(fd).st_size
        if shard_size is not None and got != shard_size:
            raise ManifestError(f"shard {shard} of {self.root} has {got} bytes, the manifest says {shard_size} "
                                f"(changed or truncated): {fix}")
        if self.verify_hashes and sha256:
            with os.fdopen(os.dup(fd), "rb") as f:
                digest = sha256_file(f)
            if digest != sha256:
                raise ManifestError(f"shard {shard} of {self.root}: sha256 {digest[:12]}... is not the manifest's "
                                    f"{sha256[:12]}...: {fix}")
        with self._lock:
            self._checked.add(shard)

    def _pread(self, shard: str, size: int, offset: int, shard_size: Optional[int],
               sha256: Optional[str] = None) -> bytes:
        if self.cache is None:
            try:
                fd = self._fd(shard)
            except FileNotFoundError:
                raise ManifestError(f"shard {shard} of {self.root} is missing: check the set with `tubelet-verify "
                                    f"root={self.root}` and rebuild it with `make shards`") from None
            self._check(shard, fd, shard_size, sha256)
            return os.pread(fd, size, offset)
        safe_name(shard, self.root)
        if shard_size is None:
            raise ManifestError(f"shard {shard} of {self.root}: no size in the manifest, needed to cache it")
        for attempt in range(3):  # another process of the node may evict it between download and open
            try:
                fd = os.open(self.cache.path(shard, shard_size), os.O_RDONLY)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            self._check(shard, fd, shard_size, sha256)
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def read(self, shard: str, offset: int, size: int, name: str, shard_size: Optional[int] = None,
             sha256: Optional[str] = None) -> bytes:
        """The data of member `name`; its tar header must precede it (else the shard does not match)."""
        blob = self._pread(shard, size + tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE, shard_size, sha256)
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
        if self.cache is not None:
            self.cache.close()


def store_for(cfg) -> ShardStore:
    """The store of a loader's `data` config (pipeline.config.LoaderConfig)."""
    return ShardStore(cfg.root, cfg.cache_dir, cache_max_bytes=cfg.cache_max_bytes, retry=cfg.retry_policy(),
                      download_threads=cfg.download_threads, verify_hashes=cfg.verify_hashes)
