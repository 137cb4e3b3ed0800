"""Images through the same stages: `make shards kind=image` (validation, conversion, EXIF, rejects, the manifest's
kind)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from shards.build import run
from shards.config import ShardsConfig
from shards.manifest import read_manifest, read_rejects, verify


def _gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, w + h)], -1)
    return np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_inputs(root: Path) -> dict:
    """ImageNet-style class folders with every kind of image users bring, good and bad; name -> expectation."""
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    rgb = Image.fromarray(_gradient(120, 80))
    rgb.save(cat / "plain.jpg", quality=90)  # baseline RGB JPEG: stored as it is
    rgba = Image.fromarray(np.dstack([_gradient(64, 48), np.full((48, 64), 128, np.uint8)]))
    rgba.save(cat / "alpha.png")
    rgb.convert("CMYK").save(cat / "cmyk.jpg")
    rgb.convert("L").save(dog / "grey.png")
    Image.fromarray(_gradient(50, 40)[..., 0].astype(np.uint16) * 257).save(dog / "deep.png")  # 16-bit grey
    rgb.convert("P").save(dog / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb.save(dog / "rotated.jpg", exif=exif, quality=90)
    buf = io.BytesIO()
    Image.fromarray(_gradient(200, 150)).save(buf, "JPEG", quality=90)
    (dog / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (dog / "empty.jpg").write_bytes(b"")
    (dog / "text.jpg").write_text("not an image at all\n")
    Image.fromarray(_gradient(400, 300)).save(dog / "huge.png")
    return {"plain": (120, 80), "alpha": (64, 48), "cmyk": (120, 80), "grey": (120, 80), "deep": (50, 40),
            "palette": (120, 80), "rotated": (80, 120)}


def test_make_shards_on_images_validates_converts_and_rejects(tmp_path):
    expected = write_inputs(tmp_path / "in")
    out = tmp_path / "shards"
    cfg = load_config(ShardsConfig, None, [f"inputs.train={tmp_path / 'in'}", f"output={out}", "kind=image",
                                           "labels_from_dirs=true", "workers=2", "progress=false",
                                           "image.max_pixels=100000"])
    summary = run(cfg)
    m = read_manifest(str(out))
    verify(m, check_hashes=True)
    assert m.kind == "image" and m.classes == ["cat", "dog"]
    rows = {r["source"].rsplit("/", 1)[1].split(".")[0]: r for r in m.samples.to_pylist()}
    assert {k: (r["width"], r["height"]) for k, r in rows.items()} == expected
    assert all(r["ext"] == "jpg" and r["nframes"] == 1 and r["codec"] == "jpeg" for r in rows.values())
    assert rows["rotated"]["rotation"] == 270 and rows["plain"]["label"] == "cat"
    rejects = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in read_rejects(str(out)).to_pylist()}
    assert rejects == {"truncated.jpg": "truncated", "empty.jpg": "empty_file", "text.jpg": "not_an_image",
                       "huge.png": "bad_dimensions"}
    assert summary["sharded"] == 7
    # what is stored: plain RGB JPEG bytes, upright; the baseline RGB JPEG kept byte for byte
    by_key = {}
    for shard in m.shards:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    by_key[member.name[:-4]] = tar.extractfile(member).read()
    stored = {name: by_key[r["key"]] for name, r in rows.items()}
    assert stored["plain"] == (tmp_path / "in" / "cat" / "plain.jpg").read_bytes()
    for name, data in stored.items():
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == expected[name]
    alpha = np.asarray(Image.open(io.BytesIO(stored["alpha"])), np.float32)
    assert alpha.mean() > 150  # composited on white, not on black
    # the rotated image's first stored row is the source's first column, reversed (90 degrees clockwise)
    src = np.asarray(Image.open(tmp_path / "in" / "dog" / "rotated.jpg").convert("L"), np.float32)
    got = np.asarray(Image.open(io.BytesIO(stored["rotated"])).convert("L"), np.float32)
    assert np.abs(got[0, :] - src[::-1, 0]).mean() < 12


def test_image_short_side_and_a_rerun_resumes(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(_gradient(300, 200)).save(tmp_path / "in" / "a.png")
    out = tmp_path / "shards"
    args = [f"inputs.train={tmp_path / 'in'}", f"output={out}", "kind=image", "image.short_side=100",
            "workers=1", "progress=false"]
    run(load_config(ShardsConfig, None, args))
    row = read_manifest(str(out)).samples.to_pylist()[0]
    assert (row["width"], row["height"]) == (150, 100)
    again = run(load_config(ShardsConfig, None, args))
    assert again["videos_processed"] == 0  # finished groups are not redone
    with pytest.raises(Exception, match="other inputs or settings"):
        run(load_config(ShardsConfig, None, args[:-3] + ["image.short_side=120", "workers=1", "progress=false"]))
