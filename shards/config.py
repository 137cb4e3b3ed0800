"""`make shards` settings: the typed schema of `configs/shards.yaml` (loaded with `common.config.load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from common.config import check
from shards.images import ImageConfig


@dataclass
class TranscodeConfig:
    codec: str = "vp9"  # vp9 (DALI decodes it on CPU and GPU) or h264 (GPU-only in DALI)
    short_side: int = 256  # canonical short side in pixels; 0 keeps the source size
    keyframe_interval: int = 16  # stored frames between keyframes: bounds the seek cost of every clip
    fps: float = 0.0  # frame rate before frame_step; 0 keeps the source's (variable rate becomes constant)
    # store every frame_step-th frame: a set stored at the clips' sampling rate (frame_step = the trainer's
    # data.frame_stride, e.g. 4) decodes only the frames clips use; data.frame_stride must be a multiple of it
    frame_step: int = 1
    # width and height are multiples of this (the long side rounded to the nearest, never upscaled): 16 lets a
    # GPU decoder be reused from video to video (coded size = display size); 2 is the least 4:2:0 needs
    align: int = 16
    crf: int = 32  # quality (lower is better): libvpx-vp9 and libx264 both take a CRF
    speed: int = 6  # vp9: libvpx cpu-used (0 slow .. 8 fast); h264: 0..8 maps to x264 presets
    max_frames: int = 0  # cut longer videos to this many output frames; 0 = no limit

    def validate(self) -> None:
        check(self.codec in ("vp9", "h264"), "codec", f"must be vp9 or h264, got {self.codec!r}")
        check(self.short_side == 0 or 16 <= self.short_side <= 4096, "short_side",
              "must be 0 (keep) or between 16 and 4096")
        check(self.keyframe_interval >= 1, "keyframe_interval", "must be >= 1")
        check(0 <= self.fps <= 240, "fps", "must be 0 (keep) or a rate up to 240")
        check(1 <= self.frame_step <= 64, "frame_step", "must be between 1 (every frame) and 64")
        check(self.align in (2, 4, 8, 16, 32, 64), "align", f"must be 2, 4, 8, 16, 32 or 64, got {self.align!r}")
        check(0 <= self.crf <= 63, "crf", "must be in [0, 63]")
        check(0 <= self.speed <= 8, "speed", "must be in [0, 8]")
        check(self.max_frames >= 0, "max_frames", "must be >= 0")


@dataclass
class FilterConfig:
    """What counts as bad input. Videos outside these bounds are rejected with a reason, never sharded."""

    min_duration: float = 0.5  # seconds
    max_duration: float = 4 * 3600.0
    min_side: int = 16  # pixels
    max_side: int = 8192
    max_file_bytes: int = 64 * 2**30
    max_aspect: float = 8.0  # long side / short side
    decode_check: str = "auto"  # auto: DALI where it can decode the codec on this machine, else PyAV; pyav; dali

    def validate(self) -> None:
        check(0 <= self.min_duration < self.max_duration, "min_duration", "must be >= 0 and below max_duration")
        check(1 <= self.min_side <= self.max_side, "min_side", "must be >= 1 and <= max_side")
        check(self.max_file_bytes > 0, "max_file_bytes", "must be > 0")
        check(self.max_aspect >= 1, "max_aspect", "must be >= 1")
        check(self.decode_check in ("auto", "dali", "pyav"), "decode_check",
              f"must be auto, dali or pyav, got {self.decode_check!r}")


@dataclass
class ShardLimits:
    max_samples: int = 512  # inputs per shard group (a group spills into extra shards past max_bytes)
    max_bytes: int = 2**30

    def validate(self) -> None:
        check(self.max_samples >= 1, "max_samples", "must be >= 1")
        check(self.max_bytes >= 2**16, "max_bytes", "must be >= 64 KiB")


@dataclass
class PartitionConfig:
    """Split one dataset over N independent jobs; each writes its own shards, `merge` writes the manifest."""

    index: int = 0
    count: int = 1

    def validate(self) -> None:
        check(self.count >= 1, "count", "must be >= 1")
        check(0 <= self.index < self.count, "index", f"must be in [0, {self.count})")


@dataclass
class ShardsConfig:
    # split name -> input: a folder (recursive), a glob, or a list file (.csv/.parquet with `path` and an
    # optional `label` column; relative paths are relative to the list file), local or any fsspec URL.
    # Empty = the built-in sample, generated into `sample_dir` when absent.
    inputs: Dict[str, str] = field(default_factory=dict)
    output: str = "data/shards/sample"  # local folder or fsspec URL
    sample_dir: str = "data/sample"  # where the built-in sample is generated when `inputs` is empty
    labels_from_dirs: bool = False  # folder/glob inputs: use each file's parent folder name as its label
    workers: int = 0  # processes; 0 = all cores
    merge: bool = False  # only write the manifest from finished partitions
    # only list the inputs into the output's `_parts/inputs/` and stop: run once before N partition jobs, so
    # that each reads its own groups from that listing instead of listing every input itself
    list_only: bool = False
    # how a rerun checks the groups earlier runs finished: hash (sizes and sha256: finds any damaged shard, reads
    # every shard once) or size (sizes and index files only: faster on huge sets). Damaged groups are rebuilt.
    check_outputs: str = "hash"
    # merge=true: re-hash every shard against its group record (reads the whole set); by default the merge checks
    # sizes and trusts the sha256 each group recorded when it was committed
    rehash: bool = False
    progress: bool = True  # a progress bar on stderr
    # video, or image: folders list image files, each stored as a JPEG (`image`), a clip of one frame
    kind: str = "video"
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    shard: ShardLimits = field(default_factory=ShardLimits)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    metrics_port: int = 0  # serve Prometheus progress on 127.0.0.1:<port> while running (make monitor: 19390); 0 = off
    # storage calls (reading inputs, writing shards and records) are tried this often on transient errors
    # (timeouts, resets, 5xx), waiting retry_backoff_s, doubled each time; an input still failing stops the run
    # (rerun to resume) instead of being rejected for good
    retries: int = 6
    retry_backoff_s: float = 0.5

    def retry_policy(self):
        from common.retry import RetryPolicy

        return RetryPolicy(attempts=self.retries, backoff_s=self.retry_backoff_s)

    def validate(self) -> None:
        for name, spec in self.inputs.items():
            check(name.replace("_", "").isalnum(), f"inputs.{name}",
                  "split names may hold only letters, digits and underscores")
            check(bool(spec.strip()), f"inputs.{name}", "is empty: name a folder, a glob or a list file (.csv/.parquet)")
        check(bool(self.output), "output", "must name a folder or URL")
        check(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        check(self.kind in ("video", "image"), "kind", f"must be video or image, got {self.kind!r}")
        check(self.retries >= 1 and self.retry_backoff_s >= 0, "retries", "retries >= 1, retry_backoff_s >= 0")
        check(not (self.list_only and self.merge), "list_only", "lists the inputs only; run merge=true on its own")
        check(self.check_outputs in ("hash", "size"), "check_outputs", f"must be hash or size, got {self.check_outputs!r}")
