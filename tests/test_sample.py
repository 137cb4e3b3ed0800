"""Tests for the built-in sample: the scene renderer (shards/synthetic/render.py) and the dataset generator
(shards/synthetic/generate.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from shards.synthetic import generate as sample
from shards.synthetic.generate import SPLITS, generate
from shards.synthetic.render import CLASSES, render_clip

av = pytest.importorskip("av")

PER_CLASS = 2  # train and val


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _all_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    ret = generate(out, seed=0, train_per_class=PER_CLASS, val_per_class=PER_CLASS, workers=2, progress=False)
    assert ret == out
    return out


@pytest.fixture(scope="module")
def meta(dataset) -> dict:
    return json.loads((dataset / "SAMPLE.json").read_text())


# ----------------------------------------------------------------------------- files


@pytest.mark.slow
def test_deterministic_across_runs_and_workers(dataset, tmp_path):
    time.sleep(1.1)  # a creation time in seconds would now differ
    other = generate(tmp_path / "again", seed=0, train_per_class=PER_CLASS, val_per_class=PER_CLASS,
                     workers=1, progress=False)
    a, b = _all_files(dataset), _all_files(other)
    assert sorted(a) == sorted(b)
    assert len(a) == 2 * PER_CLASS * len(CLASSES) + 4  # videos + 2 csv + classes.txt + SAMPLE.json
    different = [rel for rel in a if _sha(a[rel]) != _sha(b[rel])]
    assert not different, f"not byte-identical: {different}"


def test_layout_csv_and_manifest(dataset, meta):
    assert (dataset / "classes.txt").read_text().splitlines() == list(CLASSES)
    listed = set()
    for split in SPLITS:
        with open(dataset / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["path", "label"]
        body = rows[1:]
        assert len(body) == PER_CLASS * len(CLASSES)
        labels = [label for _, label in body]
        assert sorted(set(labels)) == sorted(CLASSES)
        assert all(labels.count(c) == PER_CLASS for c in CLASSES)
        for rel, label in body:
            assert not os.path.isabs(rel)
            m = re.fullmatch(r"videos/(\w+)/(\w+)/(\w+)_(\d{4})\.(mp4|webm|mkv|avi|mov)", rel)
            assert m, rel
            assert m.group(1) == split and m.group(2) == label and m.group(3) == label
            assert (dataset / rel).is_file()  # relative to the CSV's folder
            listed.add(rel)
    videos = {p for p in _all_files(dataset) if p.startswith("videos/")}
    assert videos == listed

    assert meta["params"]["seed"] == 0 and meta["params"]["version"] == sample.GENERATOR_VERSION
    assert meta["params"]["classes"] == list(CLASSES)
    assert meta["counts"] == {s: PER_CLASS * len(CLASSES) for s in SPLITS}
    files = _all_files(dataset)
    assert set(meta["files"]) == set(files) - {"SAMPLE.json"}
    for rel, entry in meta["files"].items():
        assert entry["sha256"] == _sha(files[rel]) and entry["bytes"] == files[rel].stat().st_size
    assert meta["total_bytes"] == sum(e["bytes"] for e in meta["files"].values())
    # no leftovers of the atomic writes
    assert not [p for p in files if Path(p).name.startswith(".")]


def test_every_video_decodes_as_intended(dataset, meta):
    for rel, entry in meta["files"].items():
        if not rel.startswith("videos/"):
            continue
        with av.open(str(dataset / rel)) as c:
            assert len(c.streams.video) == 1, rel
            st = c.streams.video[0]
            assert st.codec_context.name == entry["codec"], rel
            assert (st.width, st.height) == (entry["width"], entry["height"]), rel
            assert st.average_rate == Fraction(entry["fps"]), rel
            frames = [f for f in c.decode(st)]
            assert len(frames) == entry["frames"], rel
            assert frames[0].to_ndarray(format="rgb24").shape == (entry["height"], entry["width"], 3)
            # presentation times: one frame every 1/fps starting at 0
            times = np.array([float(f.pts * f.time_base) for f in frames])
            expected = np.arange(entry["frames"]) / entry["fps"]
            assert np.allclose(times, expected, atol=1.5e-3), rel  # mkv/webm store ms
            duration = entry["frames"] / entry["fps"]
            assert 1.4 <= duration <= 4.1, rel
            assert c.duration is not None and abs(c.duration / 1e6 - duration) < 0.05, rel


def test_videos_show_the_rendered_clips(dataset, meta):
    """Decoded pixels match the renderer (checks the direct 4:2:0 / colour-range path)."""
    tasks = sample.plan_videos(0, {"train": PER_CLASS, "val": PER_CLASS})
    seen = set()
    for task in tasks:
        key = (meta["files"][task["rel"]]["container"], meta["files"][task["rel"]]["codec"])
        if key in seen:
            continue
        seen.add(key)
        ref = np.stack(list(sample.scene_for(task).frames())).astype(np.float32)
        with av.open(str(dataset / task["rel"])) as c:
            dec = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32)
        assert dec.shape == ref.shape
        err = np.abs(dec - ref).mean()
        assert err < 8.0, (task["rel"], err)
        assert abs((dec - ref).mean()) < 3.0, task["rel"]  # no colour-range / matrix mix-up
    assert len(seen) == 6


def test_format_variety(meta):
    vids = [e for rel, e in meta["files"].items() if rel.startswith("videos/")]
    combos = {(e["container"], e["codec"]) for e in vids}
    for need in [("mp4", "h264"), ("webm", "vp9"), ("avi", "mpeg4"), ("mov", "mjpeg")]:
        assert need in combos, (need, combos)
    assert any(c == "mkv" for c, _ in combos)
    assert any(e["height"] > e["width"] for e in vids), "no portrait video"
    assert len({(e["width"], e["height"]) for e in vids}) >= 4
    assert len({e["fps"] for e in vids}) >= 3
    durations = [e["frames"] / e["fps"] for e in vids]
    assert max(durations) - min(durations) > 1.0
    assert all(e["width"] % 2 == 0 and e["height"] % 2 == 0 for e in vids)
    # every class gets a mix of containers
    for cls in CLASSES:
        assert len({e["container"] for e in vids if e["label"] == cls}) >= 3, cls


def test_format_plan_is_balanced_across_classes():
    """In the long run every class sees exactly the same formats/resolutions: no label leak."""
    n = sample.CONFIG_PERIOD
    tasks = sample.plan_videos(0, {"train": n, "val": 0})
    per_class = {}
    for t in tasks:
        per_class.setdefault(t["cls"], []).append((t["fmt_index"], t["width"], t["height"]))
    first = sorted(per_class[CLASSES[0]])
    assert all(sorted(v) == first for v in per_class.values())
    assert len(set(first)) == n


def test_rerun_is_noop(dataset, monkeypatch):
    """A complete sample is recognised from its marker: nothing is planned, rendered or encoded again (however long
    the check takes on a busy machine), and no file is touched."""
    before = {rel: p.stat().st_mtime_ns for rel, p in _all_files(dataset).items()}

    def no_work(*args, **kwargs):
        raise AssertionError("the rerun made videos again")

    monkeypatch.setattr(sample, "plan_videos", no_work)
    monkeypatch.setattr(sample, "_make_video_star", no_work)
    generate(dataset, seed=0, train_per_class=PER_CLASS, val_per_class=PER_CLASS, progress=False)
    after = {rel: p.stat().st_mtime_ns for rel, p in _all_files(dataset).items()}
    assert before == after


@pytest.mark.slow
def test_regenerates_on_new_parameters_and_cli(tmp_path):
    out = tmp_path / "s"
    generate(out, train_per_class=1, val_per_class=1, workers=1, progress=False)
    # different parameters via the CLI: regenerated, stale videos removed
    assert sample.main([f"out={out}", "train_per_class=1", "val_per_class=0", "workers=1", "progress=false"]) == 0
    meta = json.loads((out / "SAMPLE.json").read_text())
    assert meta["params"]["train_per_class"] == 1 and meta["counts"] == {"train": 5, "val": 0}
    videos = sorted(p for p in _all_files(out) if p.startswith("videos/"))
    assert len(videos) == 5 and all(v.startswith("videos/train/") and "_0000." in v for v in videos)
    assert (out / "val.csv").read_text() == "path,label\n"
    # an incomplete folder (no marker) is regenerated
    (out / "SAMPLE.json").unlink()
    generate(out, train_per_class=1, val_per_class=0, workers=1, progress=False)
    assert json.loads((out / "SAMPLE.json").read_text()) == meta


# ----------------------------------------------------------------------------- content


def test_render_clip_basics():
    clip = render_clip(np.random.default_rng(0), "rotate", 96, 64, 5, 12)
    assert clip.shape == (5, 64, 96, 3) and clip.dtype == np.uint8
    again = render_clip(np.random.default_rng(0), "rotate", 96, 64, 5, 12)
    assert np.array_equal(clip, again)
    assert clip.std() > 10  # textured, not flat
    with pytest.raises(ValueError):
        render_clip(np.random.default_rng(0), "jump", 96, 64, 5, 12)


def test_first_frame_identical_across_classes():
    """Same generator state -> the same first frame whatever the class."""
    for seed in range(3):
        clips = [render_clip(np.random.default_rng(seed), cls, 128, 96, 6, 12) for cls in CLASSES]
        for c in clips[1:]:
            assert np.array_equal(c[0], clips[0][0])
        # ...and the motion makes them differ afterwards (except nothing: every pair differs)
        later = [c[-1] for c in clips]
        for i in range(len(CLASSES)):
            for j in range(i + 1, len(CLASSES)):
                assert not np.array_equal(later[i], later[j])


N_STAT = 40  # clips per class
W_STAT, H_STAT, F_STAT, FPS_STAT = 160, 120, 12, 12  # 1 s clips


@pytest.fixture(scope="module")
def clip_stats():
    """First-frame statistics and motion statistics of N_STAT clips per class (disjoint seeds)."""
    ys, xs = np.mgrid[0:H_STAT, 0:W_STAT] + 0.5
    first, last, motion, labels = [], [], [], []
    bg_change, still_inner = [], []
    for c, cls in enumerate(CLASSES):
        for k in range(N_STAT):
            frames, info = render_clip(np.random.default_rng([7, c, k]), cls, W_STAT, H_STAT, F_STAT, FPS_STAT,
                                       return_info=True)
            a = info["alpha"]
            f = frames.astype(np.float32)
            area = a.sum(axis=(1, 2))
            cx = (a * xs).sum(axis=(1, 2)) / area
            cy = (a * ys).sum(axis=(1, 2)) / area
            size = np.sqrt(area[0] / np.pi)
            def still_stats(t):  # appearance of frame t alone
                inside = a[t] > 0.99
                return [area[t] / (W_STAT * H_STAT), cx[t] / W_STAT, cy[t] / H_STAT,
                        *(f[t].mean(axis=(0, 1)) / 255), *(f[t][inside].mean(axis=0) / 255)]

            first.append(still_stats(0))
            last.append(still_stats(F_STAT - 1))
            both_in = (a[1:] == 1) & (a[:-1] == 1)
            both_out = (a[1:] == 0) & (a[:-1] == 0)
            diff = np.abs(f[1:] - f[:-1]).mean(axis=3)
            inner = float(diff[both_in].mean())
            motion.append([
                np.abs(np.diff(cx)).sum() / size,  # horizontal path of the centroid, in object sizes
                np.abs(np.diff(cy)).sum() / size,  # vertical path
                np.ptp(np.log(area)),  # size change
                inner / 255,  # change of the object's own pixels
            ])
            labels.append(c)
            bg_change.append(float(diff[both_out].mean()))
            if cls == "still":
                still_inner.append(inner)
    return np.array(first), np.array(last), np.array(motion), np.array(labels), np.array(bg_change), still_inner


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Fit class means on even samples, classify odd ones (z-scored features)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    train = np.arange(len(y)) % 2 == 0
    cent = np.stack([x[train & (y == c)].mean(0) for c in range(len(CLASSES))])
    pred = np.argmin(((x[~train, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    return float((pred == y[~train]).mean())


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.slow
def test_single_frame_carries_no_label(clip_stats, which):
    """Object area, centre, frame and object mean colour of one frame: same distribution in
    every class, for the first frame and (stationary motions) for a later one."""
    stats = clip_stats[0] if which == "first" else clip_stats[1]
    labels = clip_stats[3]
    # per-class means agree within sampling error
    for c in range(len(CLASSES)):
        a, b = stats[labels == c], stats[labels != c]
        z = np.abs(a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b) + 1e-12)
        assert (z < 4.0).all(), (CLASSES[c], z)
    # and a classifier on them is at chance level
    assert _nearest_centroid_accuracy(stats, labels) < 0.4


@pytest.mark.slow
def test_motion_carries_the_label(clip_stats):
    _, _, motion, labels, bg_change, still_inner = clip_stats
    acc = _nearest_centroid_accuracy(np.log(1e-3 + motion), labels)
    assert acc >= 0.9, acc
    # the background moves in every class, the still object does not change at all
    assert (bg_change > 0.5).all()
    assert max(still_inner) == 0.0
    # the intended statistic dominates for each moving class
    mean = {cls: motion[labels == c].mean(0) for c, cls in enumerate(CLASSES)}
    assert mean["translate_horizontal"][0] > 1.0 > 20 * mean["translate_horizontal"][1]
    assert mean["translate_vertical"][1] > 1.0 > 20 * mean["translate_vertical"][0]
    assert mean["zoom"][2] > 0.5 > 10 * max(mean[c][2] for c in CLASSES if c != "zoom")
    assert mean["rotate"][3] > 0.04 and max(mean["rotate"][:3]) < 0.05
