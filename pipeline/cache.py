"""A node's bounded local cache of a remote shard set, shared by all its processes, and downloads ahead by plan.

Layout: `<cache_dir>/<hash of the set's URL>/` holds complete shards under their own names, and downloads in
flight as `.<shard>.<size>.part`. A shard gets its final name only once complete and of its manifest size (a
rename), so a partial download is never mistaken for a shard, even after kill -9. Concurrency is by `flock`:
one lock per shard (the ranks of a node download each shard once; the others wait for it) and one for the
folder's accounting (space is reserved before a download starts: the declared size of every live `.part`
counts). A `.part` whose shard lock nobody holds was left by a killed process and is deleted.

Bounded: `max_bytes` caps complete shards plus reserved downloads. To make room the least recently used shards
go first, never those this process's plan still needs (`protect`); every process touches the shards its plan
will read (mtime), so the other ranks' needs count as recent too. An evicted file that a reader has open stays
readable (POSIX); readers open per read, so the disk space comes back at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import fcntl
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from common.retry import RetryPolicy

log = logging.getLogger(__name__)
_PART = re.compile(r"^\.(.+)\.(\d+)\.part$")
_NODE_COPY = re.compile(r"^\..+\.[0-9a-f]{16}$")  # node_copy's `.<name>.<version_tag>`


class CacheError(RuntimeError):
    """The cache cannot hold what the plan needs; the message says which setting to raise."""


@dataclass
class CacheStats:
    """Cumulative, for the metrics backend (each process counts its own)."""

    hits: int = 0  # shard opens served from disk (downloaded earlier, by this process or another of the node)
    misses: int = 0  # shards this process downloaded
    bytes_downloaded: int = 0
    download_seconds: float = 0.0  # summed over downloads (they run in parallel)
    wait_seconds: float = 0.0  # a reader blocked on a download: the trainer may have waited for it
    evictions: int = 0
    retries: int = 0  # storage calls retried after a transient error
    bytes_on_disk: int = 0  # at the last accounting: complete shards + reserved downloads

    def snapshot(self) -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) for f in fields(self)})


@contextlib.contextmanager
def file_lock(path: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive `flock` on `path` (created if absent) for the block; with blocking=False it yields False
    instead of waiting when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def folder_lock(folder: str):
    """The lock of a node's cache folder: held for every change to what its shard cache counts."""
    return file_lock(os.path.join(folder, ".lock"))


class ShardCache:
    """Local copies of the shards of the remote set `fs`:`remote`, in `folder`, at most `max_bytes` on disk."""

    def __init__(self, fs, remote: str, folder: str, max_bytes: int, retry: RetryPolicy, threads: int = 8):
        self.fs, self.remote, self.folder, self.max_bytes, self.retry = fs, remote.rstrip("/"), folder, max_bytes, retry
        os.makedirs(folder, exist_ok=True)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._protect: Set[str] = set()
        self._inflight: Dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tubelet-download")
        with self._folder_lock():
            self.stats.bytes_on_disk = self._usage()  # also clears what killed processes left

    # -- reading -------------------------------------------------------------------------------------

    def path(self, shard: str, size: int) -> str:
        """The local path of complete shard `shard` (`size` bytes, from the manifest); downloads it if needed,
        or waits for the download in flight."""
        fut = self._inflight.get(shard)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self._count(wait_seconds=time.perf_counter() - t0)
        final = os.path.join(self.folder, shard)
        if self._complete(final, size):
            _touch(final)
            self._count(hits=1)
            return final
        t0 = time.perf_counter()
        self._fetch(shard, size)
        self._count(wait_seconds=time.perf_counter() - t0)
        return final

    def prefetch(self, needed: Sequence[Tuple[str, int]], now: int = 0) -> None:
        """The shards the plan reads next, in order of need (the first `now` are read now): protected from
        eviction, touched (so the node's other processes keep them too), and downloaded ahead on the pool: those
        read now always, the later ones while they fit in three quarters of the cache (the rest leaves room for
        the shards other processes of the node are reading)."""
        budget, wanted, protect = self.max_bytes * 3 // 4, [], set()
        for i, (shard, size) in enumerate(needed):
            if shard in protect:
                continue
            if budget < size and i >= now:
                break
            budget -= size
            protect.add(shard)
            wanted.append((shard, size))
        with self._lock:
            self._protect = protect
            for shard, size in wanted:
                final = os.path.join(self.folder, shard)
                if shard in self._inflight and not self._inflight[shard].done():
                    continue
                if self._complete(final, size):
                    _touch(final)
                    continue
                self._inflight[shard] = self._pool.submit(self._fetch, shard, size)
            for shard in [s for s, f in self._inflight.items() if f.done() and s not in protect]:
                del self._inflight[shard]

    def small_file(self, name: str, make: Callable[[], bytes]) -> Optional[str]:
        """The local path of the small file `name` (a shard's sample rows), made once per node by `make` under a
        file lock and counted like a shard: room is made for it first (least recently used go), so it never takes
        the cache past `max_bytes`; None when it cannot be kept (the cache is full of what the plans need)."""
        final = os.path.join(self.folder, name)
        with file_lock(self._shard_lock(name)):
            if os.path.exists(final):
                _touch(final)
                return final
            data = make()
            with self._folder_lock():
                try:
                    self._make_room(name, len(data))
                except CacheError:
                    return None
                tmp = os.path.join(self.folder, f".{name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)
        return final

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- downloading ---------------------------------------------------------------------------------

    def _fetch(self, shard: str, size: int) -> None:
        final = os.path.join(self.folder, shard)
        with file_lock(self._shard_lock(shard)):  # another process of the node may be downloading it
            if self._complete(final, size):
                return
            if size > self.max_bytes:
                raise CacheError(f"shard {shard} of {self.fs.unstrip_protocol(self.remote)} ({size} bytes) is larger than "
                                 f"data.cache_max_bytes={self.max_bytes}: raise it")
            part = os.path.join(self.folder, f".{shard}.{size}.part")
            with self._folder_lock():
                self._make_room(shard, size)
                open(part, "wb").close()  # the reservation: counted at `size` from now on
            try:
                t0 = time.perf_counter()
                url = f"{self.remote}/{shard}"
                self.retry.call(lambda: self.fs.get_file(url, part), f"downloading {self.fs.unstrip_protocol(url)}",
                                on_retry=lambda e: self._count(retries=1))
                got = os.path.getsize(part)
                if got != size:
                    raise CacheError(f"shard {shard} downloaded from {self.fs.unstrip_protocol(self.remote)} has {got} bytes, the manifest "
                                     f"says {size}: the set changed after its manifest was written; rebuild it "
                                     "with `make shards`")
                # under the folder lock, like every change to what is counted: a count that lists the folder
                # meanwhile would see neither the reservation nor the shard, and let one shard too many in
                with self._folder_lock():
                    os.replace(part, final)
                self._count(misses=1, bytes_downloaded=size, download_seconds=time.perf_counter() - t0)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)

    def _make_room(self, shard: str, size: int) -> None:
        """Evict least recently used shards, unneeded by this process's plan, until `size` more bytes fit.
        Called with the folder lock held."""
        used = self._usage()
        if used + size > self.max_bytes:
            with self._lock:
                protect = set(self._protect) | {shard}
            victims = sorted((st.st_mtime, name, st.st_size) for name, st in self._shards() if name not in protect)
            for _, name, nbytes in victims:
                if used + size <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))
                    used -= nbytes
                    self._count(evictions=1)
            if used + size > self.max_bytes:
                raise CacheError(f"data.cache_max_bytes={self.max_bytes} cannot hold shard {shard} ({size} bytes): "
                                 f"{used} bytes are in shards the plans of this node still need or in downloads; "
                                 "raise it to at least 2 x data.shuffle_window x the partitions a node reads "
                                 "(data.canonical_nodes / nodes) x the shard size, or lower data.shuffle_window")
        self.stats.bytes_on_disk = used + size

    def _usage(self) -> int:
        """Bytes of complete shards, of the set's files kept for the node (`node_copy`: counted, never evicted)
        and of live reservations; deletes the `.part` files of killed processes."""
        used = sum(st.st_size for _, st in self._shards())
        for name in os.listdir(self.folder):
            if _NODE_COPY.match(name):
                with contextlib.suppress(FileNotFoundError):
                    used += os.path.getsize(os.path.join(self.folder, name))
                continue
            m = _PART.match(name)
            if not m:
                continue
            with file_lock(self._shard_lock(m.group(1)), blocking=False) as free:
                if free:  # nobody downloads it: left by a killed process
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.folder, name))
                    continue
            used += int(m.group(2))
        return used

    def _shards(self) -> Iterable[Tuple[str, os.stat_result]]:
        for entry in os.scandir(self.folder):
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    yield entry.name, entry.stat()

    def _complete(self, final: str, size: int) -> bool:
        try:
            return os.path.getsize(final) == size
        except FileNotFoundError:
            return False

    def _shard_lock(self, shard: str) -> str:
        return os.path.join(self.folder, f".{shard}.lock")

    def _folder_lock(self):
        return folder_lock(self.folder)

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)


def _touch(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def needed_shards(rows: List[int], shards: Sequence[str], shard_bytes: Dict[str, int]) -> List[Tuple[str, int]]:
    """The distinct shards of `rows` in order of first need, with their sizes."""
    seen: Dict[str, int] = {}
    for r in rows:
        name = shards[r]
        if name not in seen:
            seen[name] = shard_bytes[name]
    return list(seen.items())


def node_copy(fs, url: str, folder: str) -> str:
    """A local copy of the small remote file `url` (a set's manifest) in the node's cache `folder`, downloaded once
    per node: the node's processes take a file lock and the first downloads it; the others find it there. The
    copy is named by the object's size and version tag (ETag, else its modification time), so a set rewritten
    at the same URL is fetched anew. One metadata request per process, one GET per node."""
    path = fs._strip_protocol(url) if hasattr(fs, "_strip_protocol") else url
    info = fs.info(path)
    final = os.path.join(folder, f".{os.path.basename(path)}.{version_tag(info)}")
    with file_lock(final + ".lock"):
        if os.path.exists(final) and os.path.getsize(final) == info.get("size"):
            return final
        part = final + ".tmp"
        fs.get_file(path, part)
        if os.path.getsize(part) != info.get("size"):
            raise CacheError(f"{url} changed while it was read: try again")
        with folder_lock(folder):  # the copy is counted by the node's shard cache (`ShardCache._usage`)
            os.replace(part, final)
    return final


def version_tag(info: Dict) -> str:
    """A short name for one version of a remote object, from its fsspec info: its size and version tag (ETag,
    else its modification time), so an object rewritten at the same URL gets another name."""
    tag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    return hashlib.sha1(f"{info.get('size')}:{tag}".encode()).hexdigest()[:16]
