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


def test_make_shards_on_images_validates_converts_and_rejects(tmp_path, caplog):
    expected = write_inputs(tmp_path / "in")
    out = tmp_path / "shards"
    cfg = load_config(ShardsConfig, None, [f"inputs.train={tmp_path / 'in'}", f"output={out}", "kind=image",
                                           "labels_from_dirs=true", "workers=2", "progress=false",
                                           "image.max_pixels=100000"])
    summary = run(cfg)
    m = read_manifest(str(out))
    verify(m.root, check_hashes=True)
    assert m.kind == "image" and m.classes == ["cat", "dog"]
    rows = {r["source"].rsplit("/", 1)[1].split(".")[0]: r for r in m.samples.to_pylist()}
    assert {k: (r["width"], r["height"]) for k, r in rows.items()} == expected
    assert all(r["ext"] == "jpg" and r["nframes"] == 1 and r["codec"] == "jpeg" for r in rows.values())
    assert rows["rotated"]["rotation"] == 270 and rows["plain"]["label"] == "cat"
    rejects = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in read_rejects(str(out)).to_pylist()}
    assert rejects == {"truncated.jpg": "truncated", "empty.jpg": "empty_file", "text.jpg": "not_an_image",
                       "huge.png": "bad_dimensions"}
    assert summary["sharded"] == 7
    text = "\n".join(r.getMessage() for r in caplog.records)  # the summary speaks of images, not videos
    assert "images in      11" in text and "images per worker CPU-second" in text
    assert "video hours" not in text and "videos" not in text and "source-seconds" not in text
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


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> str:
    """12 labelled training images of mixed sizes and formats (3 shards) and 6 validation images, sharded by
    `make shards kind=image`."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(96, 64), (128, 96), (80, 112), (100, 100)]
    for i in range(12):
        cls = ("cat", "dog", "fox")[i % 3]
        (root / "in" / cls).mkdir(parents=True, exist_ok=True)
        w, h = sizes[i % 4]
        img = Image.fromarray(_gradient(w, h, seed=i))
        img.save(root / "in" / cls / f"img{i}.{('jpg', 'png')[i % 2]}")
    for i in range(6):
        cls = ("cat", "dog", "fox")[i % 3]
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_gradient(90, 70, seed=100 + i)).save(root / "val" / cls / f"v{i}.jpg")
    out = root / "shards"
    run(load_config(ShardsConfig, None, [f"inputs.train={root / 'in'}", f"inputs.val={root / 'val'}",
                                         f"output={out}", "kind=image",
                                         "labels_from_dirs=true", "shard.max_samples=4", "workers=2",
                                         "progress=false"]))
    return str(out)


def image_cfg(root: str, *extra: str):
    from pipeline.config import LoaderConfig

    return load_config(LoaderConfig, None, [f"root={root}", "batch_size=4", "num_frames=1", "frame_stride=1",
                                            "crop_size=48", "dtype=fp32", "threads=2", "image_masks.min_keep=2",
                                            *extra])


def test_the_dali_image_loader_matches_the_pil_reference_and_resumes_exactly(image_set):
    from dataclasses import replace

    import torch

    from pipeline.loader import VideoLoader
    from pipeline.reference import ReferenceLoader

    grid = (1, 6, 6)  # 48 px at patch 8
    cfg = image_cfg(image_set)
    loader = VideoLoader(cfg, grid=grid)
    it = iter(loader)
    dali = [next(it) for _ in range(4)]  # 12 images, batch 4: crosses an epoch
    ref = list(ReferenceLoader(cfg, grid=grid).batches(4))
    for d, r in zip(dali, ref, strict=True):
        assert d.keys == r.keys and d.records == r.records
        assert d.clips.shape == (4, 3, 1, 48, 48) and r.clips.shape == d.clips.shape
        diff = (d.clips.cpu() - r.clips).abs()
        # libjpeg-turbo (DALI) and PIL decode the same JPEG alike; the resize filters round differently
        assert diff.mean() < 0.05 and diff.max() < 1.0, (diff.mean(), diff.max())
        assert len(d.masks) == 4 and all(c is d.masks[0][0] for c, _ in d.masks)  # I-JEPA: one shared context
        for (c1, t1), (c2, t2) in zip(d.masks, r.masks, strict=True):
            assert torch.equal(c1.cpu(), c2) and torch.equal(t1.cpu(), t2)
    state = {**loader.state_dict()}
    later = [next(it) for _ in range(2)]
    loader.close()
    resumed = VideoLoader(cfg, grid=grid)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a, b in zip(later, [next(again) for _ in range(2)], strict=True):
        assert a.keys == b.keys and torch.equal(a.clips, b.clips)
    resumed.close()
    with pytest.raises(Exception, match="data.num_frames=1"):
        VideoLoader(replace(cfg, num_frames=8), grid=grid)


def test_ijepa_pretraining_on_an_image_set_through_the_trainer(image_set, tmp_path):
    """The trainer as it is (checkpoints, resume, metrics off) on an image set: an image model, I-JEPA's masks
    and loss; a resumed run continues with the same losses as an uninterrupted one."""
    import json

    from train.config import TrainConfig
    from train.trainer import run as train_run

    def cfg(run_dir, *extra):
        return load_config(TrainConfig, None, [
            "model.size=tiny", "model.img_size=48", "model.patch_size=8", "model.num_frames=1",
            "model.tubelet_size=1", "model.num_mask_types=1", "model.loss=smooth_l1", "model.predictor_width=96",
            "model.predictor_depth=2", "model.predictor_heads=4", f"data.root={image_set}", "data.batch_size=4",
            "data.num_frames=1", "data.frame_stride=1", "data.crop_size=48", "data.threads=1", "data.dtype=fp32",
            "data.device=cpu", "data.image_masks.min_keep=2", "device=cpu", "metrics.enabled=false",
            "optim.warmup_steps=1", "deterministic=true", "log_every=1", "checkpoint.keep_last=0",
            "checkpoint.every_steps=2", "schedule.total_steps=4", f"run_dir={run_dir}", *extra])

    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())]

    whole = tmp_path / "whole"
    assert train_run(cfg(whole))["step"] == 4
    _probe_image_checkpoint(image_set, whole)
    parts = tmp_path / "parts"
    train_run(cfg(parts, "schedule.stop_at=2"))
    assert train_run(cfg(parts))["first_step"] == 2
    assert losses(parts) == losses(whole) and all(loss == loss for _, loss in losses(whole))


def _probe_image_checkpoint(image_set: str, run_dir: Path) -> None:
    """`make probe` on an image set: I-JEPA's linear probe on the average-pooled tokens of the image model."""
    from train.probe import ProbeConfig, run as probe_run

    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    result = probe_run(load_config(ProbeConfig, None, [
        f"checkpoint={ckpt}", f"data.root={image_set}", "head=linear", "epochs=2", "batch_size=4", "cached_passes=1",
        "data.batch_size=4", "data.threads=1", "data.dtype=fp32", "data.device=cpu", "device=cpu"]))
    assert result["head"] == "linear" and result["videos"] == 6 and 0 <= result["top1"] <= 1
    assert len(result["history"]) == 2 and all(h["loss"] > 0 for h in result["history"])


def test_a_video_encoder_is_probed_on_images_by_repeating_each_image(small_shards, image_set, tmp_path):
    """The paper's protocol for video models on image tasks: each image repeated to the encoder's frames."""
    from train.config import TrainConfig
    from train.probe import ProbeConfig, extract, run as probe_run
    from train.trainer import run as train_run

    run_dir = tmp_path / "video"
    train_run(load_config(TrainConfig, None, [
        "model.size=tiny", "model.img_size=48", "model.patch_size=8", "model.num_frames=4",
        "model.predictor_width=96", "model.predictor_depth=2", "model.predictor_heads=4", f"data.root={small_shards}",
        "data.crop_size=48", "data.num_frames=4", "data.frame_stride=1", "data.batch_size=2", "data.threads=1",
        "data.dtype=fp32", "data.device=cpu", "device=cpu", "metrics.enabled=false", "optim.warmup_steps=1",
        "checkpoint.keep_last=0", "checkpoint.every_steps=2", "schedule.total_steps=2", f"run_dir={run_dir}"]))
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    seen = []
    real = extract

    def spy(encoder, loader, steps, device, frames):
        out = real(encoder, loader, steps, device, frames)
        seen.append((frames, out["tokens"].shape[1]))
        return out

    import train.probe as probe_module

    probe_module.extract = spy
    try:
        result = probe_run(load_config(ProbeConfig, None, [
            f"checkpoint={ckpt}", f"data.root={image_set}", "epochs=1", "batch_size=4", "cached_passes=1",
            "data.batch_size=4", "data.threads=1", "data.dtype=fp32", "data.device=cpu", "device=cpu"]))
    finally:
        probe_module.extract = real
    assert result["videos"] == 6 and result["head"] == "attentive"
    assert seen and all(s == (4, 2 * 6 * 6) for s in seen)  # 4 frames / tubelet 2 x a 6 x 6 grid


def test_the_built_in_image_sample_is_deterministic_labelled_and_mixed(tmp_path):
    from shards.synthetic.images import IMAGE_CLASSES, MARKER, generate_images

    a = generate_images(str(tmp_path / "a"), train_per_class=6, val_per_class=2)
    b = generate_images(str(tmp_path / "b"), train_per_class=6, val_per_class=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != MARKER)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != MARKER)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert len(files) == 8 * len(IMAGE_CLASSES)
    assert {f.parts[1] for f in files} == set(IMAGE_CLASSES)
    modes = {Image.open(a / f).mode for f in files}
    assert {"RGB", "L", "RGBA", "CMYK"} <= modes and {f.suffix for f in files} == {".jpg", ".png", ".webp"}


def test_image_configs_load():
    from train.config import TrainConfig

    repo = Path(__file__).resolve().parents[1]
    c = load_config(TrainConfig, repo / "configs" / "train" / "ijepa_cpu.yaml", [])
    assert c.model.grid == (1, 8, 8) and c.model.loss == "smooth_l1" and c.data.image_masks.min_keep == 4
    s = load_config(ShardsConfig, repo / "configs" / "shards_images.yaml", [])
    assert s.kind == "image" and s.labels_from_dirs
