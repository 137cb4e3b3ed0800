"""A split of a shard set as the loaders see it: manifest columns as arrays, verified before use."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from common.files import is_local, url_to_fs
from common.retry import RetryPolicy
from pipeline.config import LoaderConfig
from pipeline.sampling import Plan
from pipeline.store import ShardStore
from shards.manifest import CorruptSample, Manifest, ManifestError, read_manifest, verify

@dataclass
class SplitIndex:
    root: str
    split: str
    keys: List[str]
    shards: List[str]
    exts: List[str]
    offsets: np.ndarray
    sizes: np.ndarray
    crc32: np.ndarray  # of each video's bytes, as the manifest recorded them
    nframes: np.ndarray
    fps: np.ndarray  # of the stored frames
    heights: np.ndarray
    widths: np.ndarray
    labels: np.ndarray  # -1 when unlabelled
    shard_bytes: dict
    classes: List[str]
    frame_step: int = 1  # the set stores every frame_step-th frame (1 for sets made before the option)
    keyframe_interval: int = 0  # stored frames between keyframes (0: not recorded)
    kind: str = "video"  # video | image (the manifest's)

    def __len__(self) -> int:
        return len(self.keys)

    @functools.cached_property
    def shard_of_row(self) -> np.ndarray:
        """Per row, the index of its shard among the split's shards (sorted by name): what the window order
        groups by."""
        return np.unique(np.asarray(self.shards), return_inverse=True)[1].reshape(-1)

    def geometry(self) -> List[Tuple[int, int, int]]:
        """(nframes, height, width) per row: what the sampler needs."""
        return list(zip(self.nframes.tolist(), self.heights.tolist(), self.widths.tolist()))

    def stride_for(self, frame_stride: int, key: str = "data.frame_stride") -> int:
        """A clip's stride in stored frames: `frame_stride` counts source frames, the set keeps every
        frame_step-th. The same 16 frames over the same time span either way."""
        if frame_stride % self.frame_step:
            raise ManifestError(f"{key}={frame_stride} is not a multiple of the frame_step {self.frame_step} that "
                                f"{self.root} was stored with: use a multiple of it, or a set made with "
                                f"transcode.frame_step dividing {frame_stride}")
        return frame_stride // self.frame_step

    def read_video(self, store: ShardStore, row: int) -> bytes:
        """The encoded video of manifest row `row`, checked against its CRC-32 (CorruptSample when it differs)."""
        shard = self.shards[row]
        data = store.read(shard, int(self.offsets[row]), int(self.sizes[row]), f"{self.keys[row]}.{self.exts[row]}",
                          self.shard_bytes[shard])
        if zlib.crc32(data) != int(self.crc32[row]):
            raise CorruptSample(self.root, shard, self.keys[row])
        return data


def open_split(root: str, split: str, verify_hashes: bool = False, retry: Optional[RetryPolicy] = None) -> SplitIndex:
    """Read and verify the manifest (transient storage errors retried); refuse a set whose files do not match
    it, naming the shard."""
    retry = retry or RetryPolicy()
    m: Manifest = retry.call(lambda: read_manifest(root), f"reading the manifest of {root}")
    retry.call(lambda: verify(m, check_hashes=verify_hashes), f"checking the shards of {root}")
    t = m.split(split)
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    labels = t.column("label_index").fill_null(-1).to_numpy().astype(np.int64)
    return SplitIndex(
        root=root, split=split, keys=t.column("key").to_pylist(), shards=t.column("shard").to_pylist(),
        exts=t.column("ext").to_pylist(), offsets=col("video_offset"), sizes=col("video_size"), crc32=col("video_crc32"),
        nframes=col("nframes"), fps=col("fps"), heights=col("height"), widths=col("width"), labels=labels,
        shard_bytes={s["name"]: s["bytes"] for s in m.shards}, classes=m.classes,
        frame_step=int(m.transcode.get("frame_step", 1)), keyframe_interval=int(m.transcode.get("keyframe_interval", 0)),
        kind=m.kind,
    )


def shuffle_for(cfg: LoaderConfig) -> str:
    """data.shuffle with auto resolved: window order for a remote set, global for a local one."""
    if cfg.shuffle != "auto":
        return cfg.shuffle
    return "global" if is_local(url_to_fs(cfg.root)[0]) else "window"


def plan_for(index: SplitIndex, cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1, train: bool = True,
             ranks_per_node: int = 1) -> Plan:
    """The sampling plan of `cfg` over this split, in stored frames: the clip stride divided by the set's
    frame_step, starts on keyframes with data.align_starts, the order of data.shuffle (nodes of `ranks_per_node`
    ranks: the job's local world size). Both loaders draw from it."""
    return Plan(index.geometry(), batch_size=cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                train=train, num_frames=cfg.num_frames, stride=index.stride_for(cfg.frame_stride),
                scale=cfg.crop_scale, ratio=cfg.crop_aspect, flip=cfg.flip, num_clips=cfg.eval_clips,
                num_crops=cfg.eval_crops,
                start_grid=index.keyframe_interval if cfg.align_starts and index.kind == "video" else 1,
                shuffle=shuffle_for(cfg), shard_of_row=index.shard_of_row,
                partitions=cfg.canonical_nodes, window=cfg.shuffle_window,
                ranks_per_node=ranks_per_node)
