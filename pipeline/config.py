"""The streaming loader's settings: the typed schema of a config's `data` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from common.config import check
from pipeline.image_masks import ImageMaskConfig
from pipeline.masks import MaskBlockConfig, default_masks


@dataclass
class LoaderConfig:
    root: str = "data/shards/sample"  # a shard set made by `make shards` (local folder or fsspec URL)
    split: str = "train"
    batch_size: int = 8  # per rank
    num_frames: int = 16
    frame_stride: int = 4  # in source frames; a set stored with transcode.frame_step k decodes every (stride/k)th
    # start clips on keyframes only (the set's transcode.keyframe_interval): no frame decoded before a clip's
    # first, at the cost of fewer distinct start times (one per keyframe interval)
    align_starts: bool = False
    crop_size: int = 224
    crop_scale: List[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_aspect: List[float] = field(default_factory=lambda: [0.75, 1.35])
    flip: bool = True
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (the clips as the trainer gets them)
    seed: int = 0
    threads: int = 0  # DALI CPU threads; 0 = all cores
    prefetch: int = 2  # batches DALI prepares ahead of the trainer
    device: str = "auto"  # auto (GPU when present) | cpu | cuda
    # sample order per epoch: global (one permutation of the set: every rank reads every shard), window (shards
    # permuted, samples shuffled within windows of shuffle_window shards, each node reading its share of the
    # shards about once per epoch; pipeline/sampling.py), auto = window for a remote set, global for a local one
    shuffle: str = "auto"
    shuffle_window: int = 4  # shards per shuffle window (window order)
    # window order: partitions of the set, fixed for the whole run (kept by resumes, whatever the ranks); nodes
    # read disjoint partitions when their number divides it. 0 = 8 x the nodes of the first start
    canonical_nodes: int = 0
    cache_dir: str = ""  # the node's cache of remote shards, shared by its ranks; "" = ~/.cache/tubelet/shards
    cache_max_bytes: int = 0  # bytes the cache may hold; 0 = 100 GiB or half the free disk, whichever is less
    download_threads: int = 8  # parallel shard downloads ahead of the plan (remote sets)
    prefetch_steps: int = 64  # how far ahead the plan is read for downloads (within 3/4 of the cache)
    retries: int = 6  # storage calls (downloads, manifest) tried this often on transient errors
    retry_backoff_s: float = 0.5  # first wait between tries, doubled each time (jittered, at most 30 s)
    verify_hashes: bool = False  # also sha256 each shard when first read (sizes are always checked then)
    # a sample whose bytes fail their CRC-32: skip (replaced by a repeat of another sample of its batch, flagged
    # padded, counted and logged with its key and shard) or fail (the run stops naming it). Never trained on.
    on_corrupt: str = "skip"
    masks: List[MaskBlockConfig] = field(default_factory=default_masks)  # V-JEPA mask types (pipeline/masks.py)
    image_masks: ImageMaskConfig = field(default_factory=ImageMaskConfig)  # I-JEPA's (pipeline/image_masks.py)
    eval_clips: int = 1  # evaluation views per video: clips evenly spaced in time x crops
    eval_crops: int = 1

    def validate(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.num_frames >= 1 and self.frame_stride >= 1, "num_frames",
              "num_frames and frame_stride must be >= 1")
        check(self.crop_size >= 16, "crop_size", "must be >= 16")
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
              "crop_scale", "must be [min, max] within (0, 1]")
        check(len(self.crop_aspect) == 2 and 0 < self.crop_aspect[0] <= self.crop_aspect[1],
              "crop_aspect", "must be [min, max] > 0")
        check(self.dtype in ("bf16", "fp16", "fp32"), "dtype", f"must be bf16, fp16 or fp32, got {self.dtype!r}")
        check(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        check(self.on_corrupt in ("skip", "fail"), "on_corrupt", f"must be skip or fail, got {self.on_corrupt!r}")
        check(self.prefetch >= 1 and self.threads >= 0, "prefetch", "prefetch >= 1, threads >= 0")
        check(self.eval_clips >= 1 and self.eval_crops >= 1, "eval_clips", "eval_clips/eval_crops >= 1")
        check(self.shuffle in ("auto", "global", "window"), "shuffle", f"must be auto, global or window, got {self.shuffle!r}")
        check(self.shuffle_window >= 1 and self.canonical_nodes >= 0, "shuffle_window",
              "shuffle_window >= 1, canonical_nodes >= 0")
        check(self.cache_max_bytes >= 0 and self.download_threads >= 1 and self.prefetch_steps >= 0,
              "cache_max_bytes", "cache_max_bytes >= 0, download_threads >= 1, prefetch_steps >= 0")
        check(self.retries >= 1 and self.retry_backoff_s >= 0, "retries", "retries >= 1, retry_backoff_s >= 0")

    def mask_specs(self, grid):
        """The masks of a model with token `grid` (T', H', W'): I-JEPA's for images (T' = 1), else V-JEPA's."""
        return self.image_masks if grid is not None and grid[0] == 1 else self.masks

    def retry_policy(self):
        from common.retry import RetryPolicy

        return RetryPolicy(attempts=self.retries, backoff_s=self.retry_backoff_s)
