"""The built-in image sample: small, labelled, synthetic images in ImageNet's layout (`make demo-images`).

``generate_images(out_dir)`` writes ``OUT/<split>/<class>/<class>_<index>.<ext>`` and ``OUT/IMAGES.json`` last
(atomically: the completion marker). The class is the shape drawn (disc, square, triangle, ring, cross, bar),
at a random place, size, rotation and colour on a textured background; sizes (and aspect ratios) and formats
(JPEG, PNG, WebP, greyscale PNG, RGBA PNG, CMYK JPEG) cycle through every class, so they carry no label.
Deterministic: each image's generator is seeded from (seed, split, class, index) only.

CLI::

    python -m shards.synthetic.images [out=data/sample_images] [seed=0] [train_per_class=60] [val_per_class=20]
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from common import logs
from common.cli import main_for
from common.config import check
from common.files import atomic_path, atomic_write
from shards.synthetic.render import smooth_noise

log = logging.getLogger(__name__)

IMAGE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "bar")
SIZES = ((96, 96), (128, 96), (96, 128), (112, 80), (160, 120))
FORMATS = (("jpg", "RGB"), ("png", "RGB"), ("webp", "RGB"), ("png", "L"), ("png", "RGBA"), ("jpg", "CMYK"))
SPLIT_IDS = {"train": 0, "val": 1}
MARKER = "IMAGES.json"


@dataclass
class ImageSampleConfig:
    out: str = "data/sample_images"
    seed: int = 0
    train_per_class: int = 60
    val_per_class: int = 20

    def validate(self) -> None:
        check(self.train_per_class >= 1 and self.val_per_class >= 1, "train_per_class", "counts must be >= 1")


def _shape_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one shape of class `kind`, at a random place, size and rotation."""
    size = rng.uniform(0.22, 0.38) * min(h, w)
    cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = y - cy, x - cx
    u = dx * math.cos(angle) + dy * math.sin(angle)  # rotated coordinates
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    r = np.hypot(u, v)
    if kind == "disc":
        return r < size
    if kind == "ring":
        return (r < size) & (r > 0.6 * size)
    if kind == "square":
        return (np.abs(u) < 0.8 * size) & (np.abs(v) < 0.8 * size)
    if kind == "bar":
        return (np.abs(u) < size * 1.1) & (np.abs(v) < 0.25 * size)
    if kind == "cross":
        return ((np.abs(u) < size) & (np.abs(v) < 0.25 * size)) | ((np.abs(v) < size) & (np.abs(u) < 0.25 * size))
    if kind == "triangle":  # the three half-planes of an equilateral triangle
        inside = np.ones_like(r, bool)
        for k in range(3):
            a = angle + k * 2 * math.pi / 3
            inside &= (dx * math.cos(a) + dy * math.sin(a)) < 0.5 * size
        return inside
    raise ValueError(kind)


def render_image(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] uint8: a textured background and one shape of class `kind`."""
    bg = 128 + 40 * smooth_noise(rng, 3, h, w, sigma=6.0).transpose(1, 2, 0) + rng.uniform(-40, 40, 3)
    colour = rng.uniform(0, 255, 3)
    while np.abs(colour - bg.mean((0, 1))).max() < 60:  # visible against the background
        colour = rng.uniform(0, 255, 3)
    img = bg.copy()
    img[_shape_mask(kind, h, w, rng)] = colour
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def generate_images(out: str, seed: int = 0, train_per_class: int = 60, val_per_class: int = 20) -> Path:
    """Write the sample (unless complete); returns its folder."""
    from PIL import Image

    root = Path(out)
    if (root / MARKER).exists():
        return root
    counts = {"train": train_per_class, "val": val_per_class}
    n = 0
    for split, per_class in counts.items():
        for c, kind in enumerate(IMAGE_CLASSES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, SPLIT_IDS[split], c, i])
                w, h = SIZES[(i + c) % len(SIZES)]
                ext, mode = FORMATS[(i + 2 * c) % len(FORMATS)]
                img = Image.fromarray(render_image(kind, h, w, rng))
                if mode == "RGBA":
                    img = img.convert("RGBA")
                    img.putalpha(220)
                elif mode != "RGB":
                    img = img.convert(mode)
                path = folder / f"{kind}_{i:03d}.{ext}"
                with atomic_path(path) as tmp:
                    img.save(tmp, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=92)
                n += 1
    atomic_write(root / MARKER, json.dumps({"classes": list(IMAGE_CLASSES), "images": n, "seed": seed,
                                             "per_class": counts}, indent=2).encode())
    log.info(f"wrote {n} images in {len(IMAGE_CLASSES)} classes to {root}")
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    def run(cfg: ImageSampleConfig) -> None:
        logs.console()
        generate_images(cfg.out, cfg.seed, cfg.train_per_class, cfg.val_per_class)

    return main_for(ImageSampleConfig, run, argv, prog="python -m shards.synthetic.images", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
