"""Typed configuration: dataclass schemas merged with YAML files and command-line overrides.

Every entry point builds its config the same way (`load_config`): the dataclass defaults, then the YAML
file, then `key=value` overrides, validated against the schema. Unknown keys and wrongly typed values are
errors that name the key, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.masks import MaskBlockConfig, default_masks

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says what to do."""


def load_config(schema: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from its defaults, an optional YAML file and `key=value` overrides."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        for item in overrides:
            # update (not a merge of a dotlist) so that list entries can be addressed: masks.0.num_blocks=4
            key, value = item.split("=", 1)
            try:
                OmegaConf.update(cfg, key.strip(), _parse_value(value), merge=True)
            except (OmegaConfBaseException, ValueError) as e:
                raise ConfigError(f"override {item!r}: {_first_line(e)}") from None
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        # omegaconf's message names the key and the expected type; keep it, drop the stack noise
        raise ConfigError(f"invalid config{f' in {path}' if path else ''}: {_first_line(e)}") from None
    except ValueError as e:  # a schema's __post_init__ check
        raise ConfigError(f"invalid config{f' in {path}' if path else ''}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


def _parse_value(text: str) -> Any:
    """A YAML value, except that YAML 1.1's yes/no/on/off stay strings (`amp=off` is the string "off";
    bool fields still accept them: omegaconf converts)."""
    if not text.strip():
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    return f"{lines[0]}" + (f" (key: {key})" if key and key not in lines[0] else "")


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain, JSON-able dict of a config dataclass (for manifests, checkpoints and run folders)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------------------------------
# `make shards`


@dataclass
class TranscodeConfig:
    codec: str = "vp9"  # vp9 (DALI decodes it on CPU and GPU) or h264 (GPU-only in DALI)
    short_side: int = 256  # canonical short side in pixels; 0 keeps the source size
    keyframe_interval: int = 16  # frames between keyframes: bounds the seek cost of every clip
    fps: float = 0.0  # output frame rate; 0 keeps the source's (variable rate becomes constant)
    crf: int = 32  # quality (lower is better): libvpx-vp9 and libx264 both take a CRF
    speed: int = 6  # vp9: libvpx cpu-used (0 slow .. 8 fast); h264: 0..8 maps to x264 presets
    max_frames: int = 0  # cut longer videos to this many output frames; 0 = no limit

    def validate(self) -> None:
        _check(self.codec in ("vp9", "h264"), "transcode.codec", f"must be vp9 or h264, got {self.codec!r}")
        _check(self.short_side == 0 or 16 <= self.short_side <= 4096, "transcode.short_side",
               "must be 0 (keep) or between 16 and 4096")
        _check(self.keyframe_interval >= 1, "transcode.keyframe_interval", "must be >= 1")
        _check(0 <= self.fps <= 240, "transcode.fps", "must be 0 (keep) or a rate up to 240")
        _check(0 <= self.crf <= 63, "transcode.crf", "must be in [0, 63]")
        _check(0 <= self.speed <= 8, "transcode.speed", "must be in [0, 8]")
        _check(self.max_frames >= 0, "transcode.max_frames", "must be >= 0")


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
        _check(0 <= self.min_duration < self.max_duration, "filter.min_duration",
               "must be >= 0 and below filter.max_duration")
        _check(1 <= self.min_side <= self.max_side, "filter.min_side", "must be >= 1 and <= filter.max_side")
        _check(self.max_file_bytes > 0, "filter.max_file_bytes", "must be > 0")
        _check(self.max_aspect >= 1, "filter.max_aspect", "must be >= 1")
        _check(self.decode_check in ("auto", "dali", "pyav"), "filter.decode_check",
               f"must be auto, dali or pyav, got {self.decode_check!r}")


@dataclass
class ShardLimits:
    max_samples: int = 512  # inputs per shard group (a group spills into extra shards past max_bytes)
    max_bytes: int = 2**30

    def validate(self) -> None:
        _check(self.max_samples >= 1, "shard.max_samples", "must be >= 1")
        _check(self.max_bytes >= 2**16, "shard.max_bytes", "must be >= 64 KiB")


@dataclass
class PartitionConfig:
    """Split one dataset over N independent jobs; each writes its own shards, `merge` writes the manifest."""

    index: int = 0
    count: int = 1

    def validate(self) -> None:
        _check(self.count >= 1, "partition.count", "must be >= 1")
        _check(0 <= self.index < self.count, "partition.index", f"must be in [0, {self.count})")


@dataclass
class ShardsConfig:
    # split name -> input: a folder (recursive), a glob, or a list file (.csv/.parquet with `path` and an
    # optional `label` column; relative paths are relative to the list file), local or any fsspec URL.
    # Empty = the built-in sample, generated into `sample_dir` when absent.
    inputs: Dict[str, str] = field(default_factory=dict)
    output: str = "shards/sample"  # local folder or fsspec URL
    sample_dir: str = "data/sample"
    labels_from_dirs: bool = False  # folder/glob inputs: use each file's parent folder name as its label
    workers: int = 0  # processes; 0 = all cores
    merge: bool = False  # only write the manifest from finished partitions
    progress: bool = True
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    shard: ShardLimits = field(default_factory=ShardLimits)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    metrics_port: int = 0  # serve Prometheus progress counters on 127.0.0.1:<port> while running; 0 = off

    def validate(self) -> None:
        for name in self.inputs:
            _check(name.replace("_", "").isalnum(), f"inputs.{name}",
                   "split names may hold only letters, digits and underscores")
        _check(bool(self.output), "output", "must name a folder or URL")
        _check(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        for sub in (self.transcode, self.filter, self.shard, self.partition):
            sub.validate()


# ----------------------------------------------------------------------------------------------------
# the streaming loader


def _default_masks() -> List[MaskBlockConfig]:
    return default_masks()


@dataclass
class LoaderConfig:
    root: str = "shards/sample"  # a shard set made by `make shards` (local folder or fsspec URL)
    split: str = "train"
    batch_size: int = 8  # per rank
    num_frames: int = 16
    frame_stride: int = 4
    crop_size: int = 224
    crop_scale: List[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_aspect: List[float] = field(default_factory=lambda: [0.75, 1.35])
    flip: bool = True
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (the clips as the trainer gets them)
    seed: int = 0
    threads: int = 0  # DALI CPU threads; 0 = all cores
    prefetch: int = 2  # batches DALI prepares ahead of the trainer
    device: str = "auto"  # auto (GPU when present) | cpu | cuda
    cache_dir: str = ""  # local cache for remote shards; "" = ~/.cache/tubelet/shards
    verify_hashes: bool = False  # sha256 every shard at start (slow on big sets; sizes are always checked)
    masks: List[MaskBlockConfig] = field(default_factory=_default_masks)
    eval_clips: int = 1  # evaluation views per video: clips evenly spaced in time x crops
    eval_crops: int = 1

    def validate(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.num_frames >= 1 and self.frame_stride >= 1, "data.num_frames",
               "num_frames and frame_stride must be >= 1")
        _check(self.crop_size >= 16, "data.crop_size", "must be >= 16")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
               "data.crop_scale", "must be [min, max] within (0, 1]")
        _check(len(self.crop_aspect) == 2 and 0 < self.crop_aspect[0] <= self.crop_aspect[1],
               "data.crop_aspect", "must be [min, max] > 0")
        _check(self.dtype in ("bf16", "fp16", "fp32"), "data.dtype", f"must be bf16, fp16 or fp32, got {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda"), "data.device", "must be auto, cpu or cuda")
        _check(self.prefetch >= 1 and self.threads >= 0, "data.prefetch", "prefetch >= 1, threads >= 0")
        _check(self.eval_clips >= 1 and self.eval_crops >= 1, "data.eval_clips", "eval_clips/eval_crops >= 1")
        for i, m in enumerate(self.masks):
            try:
                m.validate()
            except ValueError as e:
                raise ConfigError(f"data.masks[{i}]: {e}") from None
