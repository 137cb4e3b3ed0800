"""A split of a shard set as the loaders see it: O(shards) at start, each shard's sample rows read with that shard.

Opening a split reads the set's `manifest.parquet` (one row per shard; for a remote set once per node, into the node's
cache folder, `pipeline.cache.node_copy`) and the footer of `samples.arrow`; nothing per sample. Rows are numbered
shard after shard in the manifest's order, so row r is sample r - first[s] of shard s = the last shard whose first row
is <= r (`np.searchsorted`). A shard's sample rows (key, offsets, sizes, CRC-32, frames, fps, geometry, label) are one
record batch of `samples.arrow`, read when the plan first needs that shard (memory-mapped when local; when remote, one
ranged read per node, kept in the node's shard cache for its other processes) and kept in a small LRU. A column needed
for every sample (the labels of `tubelet-probe`, `keys` for tools) is read by itself, as an array.

Nothing here lists or parses every shard: the set was verified when it was written and by `tubelet-verify`; the
store checks each shard's size (and sha256 with data.verify_hashes) when it first reads it (`pipeline/store.py`).
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from common.files import is_local, join, url_to_fs
from common.retry import RetryPolicy
from pipeline.cache import ShardCache, node_copy, version_tag
from pipeline.config import LoaderConfig
from pipeline.sampling import Plan
from pipeline.store import ShardStore, cache_folder
from shards.manifest import SAMPLES, CorruptSample, ManifestError, read_set_index

# the columns a loader reads per shard (the others, source paths and the like, stay in the file)
_ROW_COLUMNS = ("key", "shard", "ext", "video_offset", "video_size", "video_crc32", "nframes", "fps", "height", "width",
                "label_index")
_KEEP_SHARDS = 256  # decoded shards kept per process (~60 kB each): a node's windows (8 partitions x 4 shards)


@dataclass
class ShardRows:
    """One shard's samples, as arrays."""

    keys: pa.Array  # strings, turned into Python ones only for the rows read (a global order reads a few a shard)
    exts: pa.Array
    offsets: np.ndarray
    sizes: np.ndarray
    crc32: np.ndarray  # of each video's bytes, as the manifest recorded them
    nframes: np.ndarray
    fps: np.ndarray  # of the stored frames
    heights: np.ndarray
    widths: np.ndarray
    labels: np.ndarray  # -1 when unlabelled


class _Samples:
    """samples.arrow of a set, opened once per process: its footer is read, the record batches on demand. For a
    remote set with the node's shard cache (`use_cache`), a batch is read from the store once per node: the first
    process to need it keeps it in the cache folder (`rows-<version>-<batch>.arrow`, counted and evicted like a
    shard: `ShardCache.small_file`), the node's others map that file."""

    def __init__(self, root: str):
        url = join(root, SAMPLES)
        fs, path = url_to_fs(url)
        self.url, self.fs, self.path = url, fs, path
        try:
            if is_local(fs):
                self._source = pa.memory_map(path)  # pages read when touched: a batch costs its bytes
            else:  # ranged reads of what is asked for, not fsspec's read-ahead blocks
                self._source = fs.open(path, "rb", block_size=1 << 16)
            names = pa.ipc.open_file(self._source).schema.names
            # only the loader's columns of a shard's batch are read (the source paths and the like stay on disk)
            opts = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in _ROW_COLUMNS])
            self._reader = pa.ipc.open_file(self._source, options=opts)
        except FileNotFoundError:
            raise ManifestError(f"{root} has a manifest.parquet but no {SAMPLES}: the set is damaged; rebuild it "
                                "with `make shards`") from None
        self._names = names
        self._lock = threading.Lock()
        self._cache: Optional[ShardCache] = None
        self._version = ""

    def use_cache(self, cache: Optional[ShardCache]) -> None:
        if cache is None or is_local(self.fs):
            return
        # named by the object's size and version (from the open file's metadata: no extra request), so the
        # rows of a set rewritten at the same URL are read anew
        self._version = version_tag(getattr(self._source, "details", None) or self.fs.info(self.path))
        self._cache = cache

    @property
    def num_batches(self) -> int:
        return self._reader.num_record_batches

    def batch(self, i: int) -> pa.RecordBatch:
        if self._cache is not None:
            got = self._cached_batch(i)
            if got is not None:
                return got
        with self._lock:  # one reader, used by the feeder thread and the consumer
            return self._reader.get_batch(i)

    def _cached_batch(self, i: int) -> Optional[pa.RecordBatch]:
        """Batch i from the node's cache (made there from the store by the node's first process to need it);
        None when the cache cannot keep it (then it is read from the store)."""
        def make() -> bytes:
            with self._lock:
                batch = self._reader.get_batch(i)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, batch.schema) as w:
                w.write_batch(batch)
            return sink.getvalue().to_pybytes()

        path = self._cache.small_file(f"rows-{self._version}-{i:07d}.arrow", make)
        try:
            return None if path is None else pa.ipc.open_file(pa.memory_map(path)).get_batch(0)
        except FileNotFoundError:  # evicted since (another process made room)
            return None

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every sample, read by itself (only its buffers are read)."""
        fs, path = self.fs, self.path
        opts = pa.ipc.IpcReadOptions(included_fields=[self._names.index(name)])
        source = pa.memory_map(path) if is_local(fs) else fs.open(path, "rb", block_size=1 << 16)
        try:
            return pa.ipc.open_file(source, options=opts).read_all().column(name)
        finally:
            source.close()


class SplitIndex:
    """The rows of one split: `len(index)` samples in the split's shards (`shards`, manifest order)."""

    def __init__(self, root: str, split: str, shards: pa.Table, meta: dict, samples: _Samples):
        self.root, self.split, self.kind = root, split, str(meta.get("kind", "video"))
        mine = shards.filter(pa.compute.equal(shards["split"], split))
        if mine.num_rows == 0:
            have = sorted(set(shards.column("split").to_pylist()))
            raise ManifestError(f"{root}: no samples in split {split!r} (splits: {have})")
        self.shards: List[str] = mine.column("name").to_pylist()
        self.shard_counts = mine.column("samples").to_numpy().astype(np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.shard_counts)[:-1]]).astype(np.int64)  # in the split
        self._set_row = mine.column("row").to_numpy().astype(np.int64)  # first row in samples.arrow
        self._batch = mine.column("batch").to_numpy().astype(np.int64)
        self.shard_bytes: Dict[str, int] = dict(zip(self.shards, mine.column("bytes").to_pylist()))
        self.shard_sha256: Dict[str, str] = dict(zip(self.shards, mine.column("sha256").to_pylist()))
        self._n = int(self.shard_counts.sum())
        transcode = dict(meta.get("config", {}).get("transcode", {}))
        self.classes: List[str] = list(meta.get("classes", []))
        self.frame_step = int(transcode.get("frame_step", 1))  # the set stores every frame_step-th frame
        self.keyframe_interval = int(transcode.get("keyframe_interval", 0))  # stored frames between keyframes
        self._samples = samples
        self._rows: "OrderedDict[int, ShardRows]" = OrderedDict()
        self._lock = threading.Lock()
        self.shard_of = _ShardOf(self)  # shard_of[row]: its shard's name

    def __len__(self) -> int:
        return self._n

    def use_cache(self, cache: Optional[ShardCache]) -> None:
        """Read the shards' rows of a remote set through the node's shard cache (`ShardStore.cache`): once per
        node, counted within the cache's size."""
        self._samples.use_cache(cache)

    # -- rows ----------------------------------------------------------------------------------------

    def locate(self, row: int) -> Tuple[int, int]:
        """(shard index in `shards`, sample index in that shard) of split row `row`."""
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} outside the {self._n} samples of split {self.split} of {self.root}")
        s = int(np.searchsorted(self.first, row, side="right")) - 1
        return s, row - int(self.first[s])

    def shard_rows(self, s: int) -> ShardRows:
        """Shard s's samples, read on first need (LRU of `_KEEP_SHARDS`)."""
        with self._lock:
            got = self._rows.get(s)
            if got is not None:
                self._rows.move_to_end(s)
                return got
        b = self._samples.batch(int(self._batch[s]))
        if b.num_rows != self.shard_counts[s] or (b.num_rows and b.column(b.schema.get_field_index("shard"))[0].as_py()
                                                  != self.shards[s]):
            raise ManifestError(f"record batch {int(self._batch[s])} of {self._samples.url} does not hold the "
                                f"{int(self.shard_counts[s])} samples of shard {self.shards[s]}: the set's files do "
                                "not belong together; rebuild it with `make shards`")
        col = lambda name: b.column(b.schema.get_field_index(name))  # noqa: E731
        num = lambda name: col(name).to_numpy(zero_copy_only=False)  # noqa: E731
        rows = ShardRows(col("key"), col("ext"), num("video_offset"), num("video_size"),
                         num("video_crc32"), num("nframes"), num("fps"), num("height"), num("width"),
                         col("label_index").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
        with self._lock:
            self._rows[s] = rows
            while len(self._rows) > _KEEP_SHARDS:
                self._rows.popitem(last=False)
        return rows

    def _at(self, row: int) -> Tuple[ShardRows, int]:
        s, i = self.locate(row)
        return self.shard_rows(s), i

    def __getitem__(self, row: int) -> Tuple[int, int, int]:
        """(nframes, height, width) of row `row`: what the sampler needs (pipeline.sampling.Plan)."""
        r, i = self._at(row)
        return int(r.nframes[i]), int(r.heights[i]), int(r.widths[i])

    def key(self, row: int) -> str:
        r, i = self._at(row)
        return r.keys[i].as_py()

    def ext(self, row: int) -> str:
        r, i = self._at(row)
        return r.exts[i].as_py()

    def nframes(self, row: int) -> int:
        r, i = self._at(row)
        return int(r.nframes[i])

    def fps(self, row: int) -> float:
        r, i = self._at(row)
        return float(r.fps[i])

    def labels_of(self, rows: Sequence[int]) -> np.ndarray:
        out = np.empty(len(rows), np.int64)
        for j, row in enumerate(rows):
            r, i = self._at(row)
            out[j] = r.labels[i]
        return out

    # -- whole columns (read by themselves, as arrays) ----------------------------------------------

    def _split_rows(self) -> np.ndarray:
        """Per split row, its row in samples.arrow."""
        return np.repeat(self._set_row - self.first, self.shard_counts) + np.arange(self._n)

    def column(self, name: str) -> np.ndarray:
        """One numeric column of samples.arrow for every row of the split (a duration filter, a class count), read
        by itself into one array: never a Python object per row."""
        col = self._samples.column(name)
        if name == "label_index":
            col = col.fill_null(-1)
        return col.to_numpy()[self._split_rows()]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every sample's class index (-1: unlabelled), the one column read alone: for a class count, the probe."""
        return self.column("label_index").astype(np.int64)

    @functools.cached_property
    def keys(self) -> List[str]:
        """Every sample's key, in row order: for tools and tests (a Python string per sample; a loader never
        needs it, it reads keys per shard)."""
        col = self._samples.column("key")
        return col.take(pa.array(self._split_rows())).to_pylist()

    # -- reading -----------------------------------------------------------------------------------

    def stride_for(self, frame_stride: int, key: str = "data.frame_stride") -> int:
        """A clip's stride in stored frames: `frame_stride` counts source frames, the set keeps every
        frame_step-th. The same 16 frames over the same time span either way."""
        if frame_stride % self.frame_step:
            raise ManifestError(f"{key}={frame_stride} is not a multiple of the frame_step {self.frame_step} that "
                                f"{self.root} was stored with: use a multiple of it, or a set made with "
                                f"transcode.frame_step dividing {frame_stride}")
        return frame_stride // self.frame_step

    def read_video(self, store: ShardStore, row: int) -> bytes:
        """The encoded video of split row `row`, checked against its CRC-32 (CorruptSample when it differs)."""
        s, i = self.locate(row)
        r, shard = self.shard_rows(s), self.shards[s]
        key = r.keys[i].as_py()
        data = store.read(shard, int(r.offsets[i]), int(r.sizes[i]), f"{key}.{r.exts[i].as_py()}",
                          self.shard_bytes[shard], self.shard_sha256[shard])
        if zlib.crc32(data) != int(r.crc32[i]):
            raise CorruptSample(self.root, shard, key)
        return data


class _ShardOf:
    """`shard_of[row]`: the name of row `row`'s shard (what the cache's prefetch groups by)."""

    def __init__(self, index: SplitIndex):
        self._index = index

    def __getitem__(self, row: int) -> str:
        return self._index.shards[self._index.locate(int(row))[0]]


def open_split(root: str, split: str, verify_hashes: bool = False, retry: Optional[RetryPolicy] = None,
               cache_dir: str = "") -> SplitIndex:
    """The split `split` of the set at `root`: its manifest (for a remote set: once per node, through the node's
    cache in `cache_dir`) and the footer of its samples file; transient storage errors retried. `verify_hashes`
    is the store's business (each shard's sha256 on its first read); kept for the callers' signature."""
    del verify_hashes
    retry = retry or RetryPolicy()
    fs, _ = url_to_fs(root)
    local_copy = None
    if not is_local(fs):
        local_copy = retry.call(lambda: node_copy(fs, join(root, "manifest.parquet"), cache_folder(root, cache_dir)),
                                f"reading the manifest of {root}")
    index = retry.call(lambda: read_set_index(root, local_copy), f"reading the manifest of {root}")
    samples = retry.call(lambda: _Samples(root), f"opening the samples of {root}")
    return SplitIndex(root, split, index.shards, index.meta, samples)


def shuffle_for(cfg: LoaderConfig) -> str:
    """data.shuffle with auto resolved: window order for a remote set, global for a local one."""
    if cfg.shuffle != "auto":
        return cfg.shuffle
    return "global" if is_local(url_to_fs(cfg.root)[0]) else "window"


def plan_for(index: SplitIndex, cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1, train: bool = True,
             ranks_per_node: int = 1) -> Plan:
    """The sampling plan of `cfg` over this split, in stored frames: the clip stride divided by the set's
    frame_step, starts on keyframes with data.align_starts, the order of data.shuffle (nodes of `ranks_per_node`
    ranks: the job's local world size). Both loaders draw from it; it holds per-shard counts, never a per-row
    array (the geometry of a row is read with its shard, when the plan draws its record)."""
    return Plan(index, batch_size=cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                train=train, num_frames=cfg.num_frames, stride=index.stride_for(cfg.frame_stride),
                scale=cfg.crop_scale, ratio=cfg.crop_aspect, flip=cfg.flip, num_clips=cfg.eval_clips,
                num_crops=cfg.eval_crops,
                start_grid=index.keyframe_interval if cfg.align_starts and index.kind == "video" else 1,
                shuffle=shuffle_for(cfg), shard_counts=index.shard_counts,
                partitions=cfg.canonical_nodes, window=cfg.shuffle_window,
                ranks_per_node=ranks_per_node)
