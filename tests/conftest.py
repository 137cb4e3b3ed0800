"""Shared fixtures. `small_shards`: a small labelled shard set built by the real `make shards` (CPU)."""

from __future__ import annotations

import csv

import pytest

from videos import write_video  # tests/ is on sys.path (pytest rootdir conftest)

# (extension, encoder): mixed containers and codecs, as users bring them
SMALL_FORMATS = [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".mkv", "libx264"), (".avi", "mpeg4"),
                 (".mov", "mjpeg"), (".mkv", "libvpx-vp9")]
SMALL_SIZES = [(96, 64), (128, 96), (112, 80), (64, 96)]
SMALL_CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> str:
    """Build a 2-split labelled shard set; returns its output folder as a str.

    train: 12 videos (3 classes x 4), val: 4 videos; 1-2 s at 12 or 15 fps, 64..128 px, mixed codecs and
    containers, listed by `path,label` CSV files; shard.max_samples=5 so train has 3 shards, val 1.
    """
    from common.config import load_config
    from shards.config import ShardsConfig
    from shards.build import run

    root = tmp_path_factory.mktemp("small_shards")
    i = 0
    for split, per_class in (("train", 4), ("val", 1)):
        rows = []
        for c, cls in enumerate(SMALL_CLASSES + (["circle"] if split == "val" else [])):
            for j in range(per_class):
                ext, codec = SMALL_FORMATS[i % len(SMALL_FORMATS)]
                w, h = SMALL_SIZES[i % len(SMALL_SIZES)]
                fps = (12, 15)[i % 2]
                rel = f"videos/{split}/{cls}/{cls}_{c}{j}{ext}"
                write_video(root / rel, codec, w, h, fps, nframes=int(fps * (1 + (i % 3) / 2)))
                rows.append((rel, cls))
                i += 1
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label")] + rows)
    out = root / "shards"
    cfg = load_config(ShardsConfig, None, [
        f"inputs.train={root / 'train.csv'}", f"inputs.val={root / 'val.csv'}", f"output={out}",
        "workers=2", "progress=false", "shard.max_samples=5",
    ])
    run(cfg)
    return str(out)
