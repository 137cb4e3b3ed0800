"""A split of a shard set as the loaders see it: manifest columns as arrays, verified before use."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from pipeline.store import ShardStore
from shards.manifest import CorruptSample, Manifest, read_manifest, verify

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
    heights: np.ndarray
    widths: np.ndarray
    labels: np.ndarray  # -1 when unlabelled
    shard_bytes: dict
    classes: List[str]

    def __len__(self) -> int:
        return len(self.keys)

    def geometry(self) -> List[Tuple[int, int, int]]:
        """(nframes, height, width) per row: what the sampler needs."""
        return list(zip(self.nframes.tolist(), self.heights.tolist(), self.widths.tolist()))

    def read_video(self, store: ShardStore, row: int) -> bytes:
        """The encoded video of manifest row `row`, checked against its CRC-32 (CorruptSample when it differs)."""
        shard = self.shards[row]
        data = store.read(shard, int(self.offsets[row]), int(self.sizes[row]), f"{self.keys[row]}.{self.exts[row]}",
                          self.shard_bytes[shard])
        if zlib.crc32(data) != int(self.crc32[row]):
            raise CorruptSample(self.root, shard, self.keys[row])
        return data


def open_split(root: str, split: str, verify_hashes: bool = False) -> SplitIndex:
    """Read and verify the manifest; refuse a set whose files do not match it, naming the shard."""
    m: Manifest = read_manifest(root)
    verify(m, check_hashes=verify_hashes)
    t = m.split(split)
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    labels = t.column("label_index").fill_null(-1).to_numpy().astype(np.int64)
    return SplitIndex(
        root=root, split=split, keys=t.column("key").to_pylist(), shards=t.column("shard").to_pylist(),
        exts=t.column("ext").to_pylist(), offsets=col("video_offset"), sizes=col("video_size"), crc32=col("video_crc32"),
        nframes=col("nframes"), heights=col("height"), widths=col("width"), labels=labels,
        shard_bytes={s["name"]: s["bytes"] for s in m.shards}, classes=m.classes,
    )
