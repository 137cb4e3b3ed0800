"""`make shards` end to end on CPU: real encoded videos, real transcodes, real DALI.

Everything here runs the production code paths (spawned worker processes, DALI's CPU decoder, the real
tar/index/manifest writers) on tiny videos, so the whole file takes well under three minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import videos
from common.config import load_config
from shards.config import FilterConfig, ShardsConfig, TranscodeConfig
from shards.build import run
from shards.make_shards import main
from shards.output import Output, ShardsError
from shards.workers import run_jobs
from shards.manifest import ManifestError, read_manifest, read_rejects, verify
from shards.transcode import Job, Reject, Sample, process
from shards.validate import Rejected
from shards.wds import parse_index

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------------------------------
# helpers


def shard(inputs: dict, output, *overrides: str, workers: int = 2) -> dict:
    """Run `make shards` in-process; returns the summary and what it printed."""
    args = [f"inputs.{k}={v}" for k, v in inputs.items()] + [f"output={output}", f"workers={workers}",
                                                              "progress=false", *overrides]
    cfg = load_config(ShardsConfig, None, args)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run(cfg)
    return {"summary": summary, "printed": buf.getvalue()}


def tars(root) -> list:
    return sorted(p for p in os.listdir(root) if p.endswith(".tar"))


def members(tar_path) -> list:
    with tarfile.open(tar_path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def samples_by_source(root) -> dict:
    m = read_manifest(str(root))
    return {r["source"]: r for r in m.samples.to_pylist()}


def read_slice(root, shard_name, offset, size) -> bytes:
    with open(os.path.join(root, shard_name), "rb") as f:
        f.seek(offset)
        return f.read(size)


def video_bytes(root, row) -> bytes:
    return read_slice(root, row["shard"], row["video_offset"], row["video_size"])


def assert_same_manifest(a, b) -> None:
    """Same rows (keys, order, shard assignment, offsets, metadata), same shards table, same summary."""
    ma, mb = read_manifest(str(a)), read_manifest(str(b))
    assert ma.samples.to_pylist() == mb.samples.to_pylist()
    assert ma.shards == mb.shards
    assert ma.meta["summary"] == mb.meta["summary"]
    assert ma.meta["classes"] == mb.meta["classes"]
    assert read_rejects(str(a)).to_pylist() == read_rejects(str(b)).to_pylist()
    for sh in ma.shards:  # and the bytes themselves
        for name in (sh["name"], sh["index"]):
            assert Path(a, name).read_bytes() == Path(b, name).read_bytes(), name


def wds2idx_text(tar_path, tmp_path) -> str:
    import wds2idx

    idx = tmp_path / (Path(tar_path).stem + ".wds2idx")
    wds2idx.IndexCreator(str(tar_path), str(idx), verbose=False).create_index()
    return idx.read_text()


def dali_read_all(root) -> list:
    """Read every shard of a set with DALI's webdataset reader (CPU, our index files) and decode each video.

    Returns [(video bytes, json bytes, nframes bytes, decoded frames shape)] in manifest shard order.
    """
    from nvidia.dali import fn, pipeline_def

    m = read_manifest(str(root))
    paths = [os.path.join(root, s["name"]) for s in m.shards]
    idx = [os.path.join(root, s["index"]) for s in m.shards]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        v, j, n = fn.readers.webdataset(paths=paths, index_paths=idx, ext=["webm", "json", "nframes"],
                                        missing_component_behavior="error", random_shuffle=False, name="r")
        return v, j, n, fn.decoders.video(v, device="cpu")

    p = pipe()
    p.build()
    total = p.epoch_size("r")
    out = []
    for _ in range(total):
        v, j, n, frames = p.run()
        out.append((np.array(v[0]).tobytes(), np.array(j[0]).tobytes(), np.array(n[0]).tobytes(),
                    np.array(frames[0]).shape))
    return out


# ----------------------------------------------------------------------------------------------------
# output format, on the shared small set (tests/conftest.py)


def test_layout_members_and_metadata(small_shards):
    root = small_shards
    m = read_manifest(root)
    names = tars(root)
    assert names == sorted(s["name"] for s in m.shards)
    assert all(re.fullmatch(r"(train|val)-\d{6}\.tar", n) for n in names), names
    assert sorted(p for p in os.listdir(root) if p.endswith(".idx")) == sorted(s["index"] for s in m.shards)
    assert [(s["split"], s["samples"]) for s in m.shards] == [("train", 5), ("train", 5), ("train", 2),
                                                              ("val", 4)]
    assert m.classes == ["circle", "square", "triangle"]
    assert not [p for p in os.listdir(root) if p.startswith((".tmp", ".lock"))]  # no temp or lock files left
    assert "shards.log" in os.listdir(root)  # the run's log lies next to its manifest
    rows = {r["key"]: r for r in m.samples.to_pylist()}
    assert len(rows) == 16
    for sh in m.shards:
        mem = members(os.path.join(root, sh["name"]))
        assert len(mem) == 4 * sh["samples"]  # video, json, nframes, cls
        for i in range(0, len(mem), 4):
            key = mem[i][0].split(".")[0]
            assert [n for n, _ in mem[i:i + 4]] == [f"{key}.{e}" for e in ("webm", "json", "nframes", "cls")]
            meta = json.loads(mem[i + 1][1])
            row = rows[key]
            for field in ("source", "source_bytes", "duration", "fps", "nframes", "width", "height", "codec",
                          "label", "label_index"):
                assert meta[field] == row[field], field
            assert meta["source_bytes"] == os.path.getsize(meta["source"])
            assert meta["codec"] == "vp9" and meta["label"] in m.classes
            assert meta["label_index"] == m.classes.index(meta["label"])
            assert np.frombuffer(mem[i + 2][1], "<i4").tolist() == [meta["nframes"]]
            assert mem[i + 3][1] == str(meta["label_index"]).encode()
            assert abs(meta["nframes"] - meta["duration"] * meta["fps"]) < 0.01  # duration rounded to 0.1 ms
            frames = videos.decode_rgb(mem[i][1])
            assert len(frames) == meta["nframes"]
            assert frames[0].shape == (meta["height"], meta["width"], 3)
            # small sources are never upscaled (short side default 256)
            src = videos.decode_rgb(meta["source"])[0].shape
            assert (meta["height"], meta["width"]) == src[:2]


def test_index_files_identical_to_wds2idx(small_shards, tmp_path):
    for tar in glob.glob(os.path.join(small_shards, "*.tar")):
        assert Path(tar[:-4] + ".idx").read_text() == wds2idx_text(tar, tmp_path), tar


def test_manifest_offsets_hashes_and_verify(small_shards):
    import hashlib

    root = small_shards
    m = read_manifest(root)
    verify(m.root, check_hashes=True)
    for sh in m.shards:
        data = Path(root, sh["name"]).read_bytes()
        assert sh["bytes"] == len(data) and sh["sha256"] == hashlib.sha256(data).hexdigest()
    by_name = {}
    for sh in m.shards:
        for name, data in members(os.path.join(root, sh["name"])):
            by_name[name] = data
    for r in m.samples.to_pylist():
        for ext, comp in ((r["ext"], "video"), ("json", "json"), ("nframes", "nframes"), ("cls", "cls")):
            got = read_slice(root, r["shard"], r[f"{comp}_offset"], r[f"{comp}_size"])
            assert got == by_name[f"{r['key']}.{ext}"]
    # rows are in shard order, then position in shard
    order = [(r["shard"], r["index"]) for r in m.samples.to_pylist()]
    assert order == sorted(order)


def test_tampering_is_detected(small_shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small_shards, root)
    victim = read_manifest(str(root)).shards[1]
    with open(root / victim["name"], "r+b") as f:
        f.truncate(victim["bytes"] - 1024)
    with pytest.raises(ManifestError, match=re.escape(victim["name"])):
        verify(str(root))
    shutil.copy(Path(small_shards, victim["name"]), root / victim["name"])
    verify(str(root), check_hashes=True)
    # same size, other bytes: only the hash check sees it
    with open(root / victim["name"], "r+b") as f:
        f.seek(600)
        f.write(b"\xff")
    verify(str(root))
    with pytest.raises(ManifestError, match=re.escape(victim["name"])):
        verify(str(root), check_hashes=True)
    shutil.copy(Path(small_shards, victim["name"]), root / victim["name"])
    os.unlink(root / victim["index"])
    with pytest.raises(ManifestError, match=re.escape(victim["index"])):
        verify(str(root))
    shutil.copy(Path(small_shards, victim["index"]), root / victim["index"])
    # samples.arrow whose rows of one shard lost a sample (a file of another run): its record batch is named
    import pyarrow as pa

    with pa.OSFile(str(root / "samples.arrow")) as src:  # read into memory: the file is rewritten below
        reader = pa.ipc.open_file(src)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        schema = reader.schema
    batches[1] = batches[1].slice(0, batches[1].num_rows - 1)
    with pa.ipc.new_file(str(root / "samples.arrow"), schema) as w:
        for b in batches:
            w.write_batch(b)
    with pytest.raises(ManifestError, match=re.escape(victim["name"]) + ".*record batch 1 of samples.arrow holds"):
        verify(str(root))


def test_read_back_with_webdataset_library(small_shards):
    import webdataset as wds

    root = small_shards
    m = read_manifest(root)
    rows = m.samples.to_pylist()
    urls = [os.path.join(root, s["name"]) for s in m.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == [r["key"] for r in rows]
    for s, r in zip(got, rows):
        assert s["webm"] == video_bytes(root, r)
        assert s["json"] == read_slice(root, r["shard"], r["json_offset"], r["json_size"])
        assert np.frombuffer(s["nframes"], "<i4")[0] == r["nframes"]
        assert int(s["cls"]) == r["label_index"]


def test_read_back_with_dali_reader_and_decoder(small_shards):
    root = small_shards
    rows = read_manifest(root).samples.to_pylist()
    got = dali_read_all(root)
    assert len(got) == len(rows)
    for (v, j, n, shape), r in zip(got, rows):
        assert v == video_bytes(root, r)
        assert j == read_slice(root, r["shard"], r["json_offset"], r["json_size"])
        assert np.frombuffer(n, "<i4")[0] == r["nframes"]
        assert shape == (r["nframes"], r["height"], r["width"], 3)


# ----------------------------------------------------------------------------------------------------
# bad and awkward inputs, one run over a folder of them


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    src = d / "in"
    w = videos.write_video
    w(src / "good/a.mp4", "libx264", 96, 64, 12, 18)
    w(src / "good/b.webm", "libvpx-vp9", 128, 96, 15, 18)
    w(src / "good/c.avi", "mpeg4", 96, 64, 12, 14)
    w(src / "good/d.mov", "mjpeg", 64, 48, 12, 12)
    w(src / "good/e.mkv", "libvpx-vp9", 64, 96, 12, 12)
    w(src / "with space/clip one.mp4", "libx264", 64, 48, 12, 12)
    w(src / "dup/x/clip.mp4", "libx264", 64, 48, 12, 12)
    w(src / "dup/y/clip.mp4", "libx264", 64, 48, 12, 13)
    w(src / "dots.in.name.mp4", "libx264", 64, 48, 12, 12)
    w(src / "rot.mp4", "libx264", 160, 96, 12, 12, pattern="flat", rotation=90, marker="tl")
    w(src / "vfr.mkv", "libx264", 64, 48, pts=videos.vfr_pts(24, fps=12))
    bad = src / "bad"
    bad.mkdir()
    videos.write_empty(bad / "empty.mp4")
    videos.truncate_copy(w(d / "whole.webm", "libvpx-vp9", 96, 64, 12, 24), bad / "half.webm")
    videos.truncate_copy(w(d / "whole.mp4", "libx264", 96, 64, 12, 24), bad / "half.mp4")
    videos.write_not_video(bad / "text.mp4")
    videos.write_audio_only(bad / "audio.mp4")  # aac only
    videos.write_audio_only(bad / "audio.webm")  # opus only
    w(bad / "short.mp4", "libx264", 64, 48, 12, 4)
    w(bad / "thin.mp4", "libx264", 16, 256, 12, 12)  # aspect 16 > filter.max_aspect
    big = w(bad / "big.mov", "mjpeg", 128, 96, 12, 24, pattern="noise")
    assert big.stat().st_size > 60_000 > max(p.stat().st_size for p in src.rglob("*") if p != big)
    out = d / "out"
    res = shard({"train": src}, out, "filter.max_file_bytes=60000")
    return src, out, res


EXPECTED_REJECTS = {
    "bad/empty.mp4": "empty_file",
    "bad/half.webm": "truncated",  # the cluster index is gone: decodes until the cut, then ends early
    "bad/half.mp4": "truncated",  # the moov atom is at the end: it starts like an mp4 but cannot be opened
    "bad/text.mp4": "not_a_video",
    "bad/audio.mp4": "no_video_stream",
    "bad/audio.webm": "no_video_stream",
    "bad/short.mp4": "too_short",
    "bad/thin.mp4": "bad_dimensions",
    "bad/big.mov": "file_too_large",
}


def test_bad_inputs_are_rejected_with_reasons(mixed):
    src, out, res = mixed
    rejects = read_rejects(str(out)).to_pylist()
    got = {os.path.relpath(r["source"], src): r["reason"] for r in rejects}
    assert got == EXPECTED_REJECTS
    assert all(r["detail"] and r["split"] == "train" for r in rejects)
    m = read_manifest(str(out))
    sources = set(m.samples.column("source").to_pylist())
    assert len(sources) == 11 and not any("/bad/" in s for s in sources)
    rejected_keys = {r["key"] for r in rejects}
    for t in tars(out):
        assert not {n.split(".")[0] for n, _ in members(out / t)} & rejected_keys
    s = res["summary"]
    assert s["videos_in"] == 20 and s["sharded"] == 11
    assert s["rejected"] == {"bad_dimensions": 1, "empty_file": 1, "file_too_large": 1, "no_video_stream": 2,
                             "not_a_video": 1, "too_short": 1, "truncated": 2}
    # the printed summary
    p = res["printed"]
    assert "manifest.parquet" in p and "videos in      20" in p and "sharded        11" in p
    assert "rejected       9" in p and "truncated: 2" in p and "rejects.parquet" in p
    details = {os.path.relpath(r["source"], src): r["detail"] for r in rejects}
    assert "half.mp4 starts like a video container" in details["bad/half.mp4"] and "<none>" not in details["bad/half.mp4"]
    verify(m.root, check_hashes=True)


def test_every_sample_of_mixed_set_decodes_with_dali(mixed):
    _, out, _ = mixed
    rows = read_manifest(str(out)).samples.to_pylist()
    got = dali_read_all(out)
    assert [shape for *_, shape in got] == [(r["nframes"], r["height"], r["width"], 3) for r in rows]


def test_keys_unique_and_safe(mixed):
    src, out, _ = mixed
    rows = samples_by_source(out)
    keys = [r["key"] for r in rows.values()]
    assert len(set(keys)) == len(keys) == 11
    assert all(KEY_RE.fullmatch(k) for k in keys), keys
    assert rows[str(src / "dup/x/clip.mp4")]["key"] != rows[str(src / "dup/y/clip.mp4")]["key"]
    assert rows[str(src / "with space/clip one.mp4")]["key"].startswith("with_space_clip_one-")
    assert rows[str(src / "dots.in.name.mp4")]["key"].startswith("dots_in_name-")
    for t in tars(out):
        for name, _ in members(out / t):
            assert " " not in name and "/" not in name and name.count(".") == 1


def test_rotation_metadata_is_applied(mixed):
    src, out, _ = mixed
    r = samples_by_source(out)[str(src / "rot.mp4")]
    assert r["rotation"] == 90
    assert (r["width"], r["height"]) == (96, 160)  # landscape 160x96 displayed rotated: portrait
    frame = videos.decode_rgb(video_bytes(out, r))[0]
    assert frame.shape == (160, 96, 3)
    # display rotation 90 = 90 degrees counter-clockwise (what `ffmpeg` autorotate shows): the marker
    # in the source's top-left corner ends up bottom-left
    corners = {"tl": frame[:12, :12], "tr": frame[:12, -12:], "bl": frame[-12:, :12], "br": frame[-12:, -12:]}
    bright = {k: float(v.mean()) for k, v in corners.items()}
    assert bright["bl"] > 230 and max(bright["tl"], bright["tr"], bright["br"]) < 120, bright


def test_variable_frame_rate_becomes_constant(mixed):
    src, out, _ = mixed
    r = samples_by_source(out)[str(src / "vfr.mkv")]
    meta = json.loads(read_slice(out, r["shard"], r["json_offset"], r["json_size"]))
    assert meta["vfr"] is True and r["vfr"] is True
    assert not samples_by_source(out)[str(src / "good/a.mp4")]["vfr"]
    with av.open(io.BytesIO(video_bytes(out, r))) as c:
        st = c.streams.video[0]
        pts = [f.pts for f in c.decode(st)]
        tb = st.time_base
    steps = np.diff(pts) * float(tb)
    assert np.allclose(steps, 1 / r["fps"], atol=2e-3), steps  # webm stores ms timestamps
    assert len(pts) == r["nframes"]
    assert abs(r["nframes"] - meta["source_duration"] * r["fps"]) <= 1
    assert abs(r["nframes"] - 24) <= 3


@pytest.mark.parametrize("flt, reason", [
    (dict(max_file_bytes=1000), "file_too_large"),
    (dict(max_side=32), "bad_dimensions"),
    (dict(min_side=64), "bad_dimensions"),
    (dict(max_duration=1.0), "too_long"),
    (dict(min_duration=2.0), "too_short"),
])
def test_filters_in_process(tmp_path, flt, reason):
    path = videos.write_video(tmp_path / "v.mp4", "libx264", 64, 48, 12, 18)
    r = process(Job("k", str(path), None, None, TranscodeConfig(), FilterConfig(**flt)))
    assert isinstance(r, Reject) and r.reason == reason, r


def test_unreadable_path_is_rejected_not_raised(tmp_path):
    r = process(Job("k", str(tmp_path / "missing.mp4"), None, None))
    assert isinstance(r, Reject) and r.reason == "unreadable"


# ----------------------------------------------------------------------------------------------------
# transcode settings and shard limits


def test_output_sizes_are_whole_macroblocks_never_upscaled():
    from shards.transcode import _output_size

    assert _output_size(602, 338, 256) == (456, 256)  # align 2 (sets made before align): even sides
    assert _output_size(602, 338, 256, 16) == (448, 256)  # 455.9 -> 448: 456 is not a multiple of 16
    assert _output_size(1920, 1080, 256, 16) == (448, 256)
    assert _output_size(338, 602, 256, 16) == (256, 448)  # portrait
    assert _output_size(250, 136, 256, 16) == (240, 128)  # small source: rounded down, never up
    assert _output_size(100, 100, 0, 16) == (96, 96)
    for w, h in ((640, 360), (720, 480), (1280, 536), (454, 256), (300, 200)):
        ow, oh = _output_size(w, h, 256, 16)
        assert ow % 16 == 0 and oh % 16 == 0 and ow <= w and oh <= h
        assert abs(ow / oh - w / h) <= 8 / min(ow, oh) + 1e-9  # aspect kept within half a macroblock


def test_frame_step_stores_every_kth_frame(tmp_path):
    """transcode.frame_step=4: the set keeps source frames 0, 4, 8, ... (the frame's grey level tells which),
    at a quarter of the rate, keyframes every keyframe_interval stored frames, sizes in whole macroblocks; the
    manifest records the step for the loader."""
    src = tmp_path / "in"
    videos.write_video(src / "count.mp4", "libx264", 136, 96, 30, 40, pattern="counter")
    out = tmp_path / "out"
    shard({"train": src}, out, "transcode.frame_step=4", "transcode.keyframe_interval=4", "transcode.crf=4")
    m = read_manifest(str(out))
    assert m.transcode["frame_step"] == 4 and m.transcode["keyframe_interval"] == 4
    (r,) = m.samples.to_pylist()
    assert (r["nframes"], r["fps"], r["width"], r["height"]) == (10, 7.5, 128, 96)
    assert r["duration"] == pytest.approx(40 / 30, abs=0.01)
    data = video_bytes(out, r)
    levels = [float(f.mean()) for f in videos.decode_rgb(data)]
    assert np.allclose(levels, [10 + 6 * 4 * k for k in range(10)], atol=2.5), levels
    with av.open(io.BytesIO(data)) as c:
        keys = [i for i, p in enumerate(c.demux(c.streams.video[0])) if p.size and p.is_keyframe]
    assert keys == [0, 4, 8]


@pytest.mark.slow
def test_h264_fps_keyframes_short_side_and_byte_spill(tmp_path):
    src = tmp_path / "in"
    for i in range(3):  # incompressible content, so the shards pass 64 KiB
        videos.write_video(src / f"n{i}.mp4", "libx264", 128, 96, 12, 18, pattern="noise")
    videos.write_video(src / "small.webm", "libvpx-vp9", 64, 48, 12, 18)  # short side 48 < 64: kept
    out = tmp_path / "out"
    shard({"train": src}, out, "transcode.codec=h264", "transcode.fps=8", "transcode.keyframe_interval=4",
          "transcode.short_side=64", "transcode.crf=10", "shard.max_bytes=65536")
    m = read_manifest(str(out))
    verify(m.root, check_hashes=True)
    rows = m.samples.to_pylist()
    assert len(rows) == 4 and {r["ext"] for r in rows} == {"mp4"} and {r["codec"] for r in rows} == {"h264"}
    # byte limit: the group spills into <split>-GGGGGG-P.tar, each within the limit unless one sample is
    names = [s["name"] for s in m.shards]
    assert len(names) >= 2 and names[0] == "train-000000.tar", names
    assert all(re.fullmatch(r"train-000000-\d+\.tar", n) for n in names[1:]), names
    for s in m.shards:
        assert s["bytes"] <= 65536 or s["samples"] == 1, s
    for r in rows:
        assert r["fps"] == 8 and r["nframes"] == 12 and r["duration"] == 1.5  # 1.5 s * 8 fps
        # 128x96 -> short side 64, long side 85.3 rounded to whole 16-pixel macroblocks (transcode.align)
        expect = (64, 48) if r["source"].endswith("small.webm") else (80, 64)
        assert (r["width"], r["height"]) == expect
        with av.open(io.BytesIO(video_bytes(out, r))) as c:
            st = c.streams.video[0]
            assert st.codec_context.name == "h264"
            keys = [i for i, p in enumerate(c.demux(st)) if p.size and p.is_keyframe]
        assert keys == [0, 4, 8], keys
    for t in tars(out):  # the PyAV decode check stood in for DALI; training on a GPU decodes them with DALI
        assert Path(out, t[:-4] + ".idx").read_text() == wds2idx_text(out / t, tmp_path)


def test_byte_limit_counts_the_tar_end_and_padding(tmp_path):
    """Two samples whose members fill max_bytes exactly do not fit: closing the tar adds 1 KiB + padding."""
    from shards.group_writer import GroupWriter
    from shards.plan import Group
    from shards.sources import Source

    cfg = load_config(ShardsConfig, None, [f"output={tmp_path / 'out'}", "shard.max_bytes=65536"])
    n = 3
    group = Group("train", 0, [Source(f"/v/{i}.mp4", f"{i}.mp4", None) for i in range(n)],
                  [f"k{i}" for i in range(n)], [None] * n)
    writer = GroupWriter(group, Output(cfg.output), cfg, str(tmp_path))
    for i in range(n):
        meta = dict(source=f"/v/{i}.mp4", source_bytes=1, source_duration=1.0, duration=1.0, fps=12.0,
                    nframes=12, width=64, height=48, codec="vp9", label=None, label_index=None, rotation=0,
                    vfr=False)
        # 512 + 30208 (video) + 2 x (512 + 512) (json, nframes) = 32 KiB of members per sample
        writer.add(i, Sample(f"k{i}", bytes(30208), "webm", meta))
    rec = writer.finish()
    assert [s["samples"] for s in rec["shards"]] == [1, 1, 1]
    for s in rec["shards"]:
        assert s["bytes"] == os.path.getsize(tmp_path / "out" / s["name"]) <= 65536


@pytest.mark.slow
def test_sample_count_limit_and_input_kinds(tmp_path):
    """Parquet list with labels for one split, a glob for the other; shard.max_samples cuts groups."""
    vids = tmp_path / "v"
    paths = []
    for i in range(5):
        paths.append(videos.write_video(vids / f"c{i % 2}/v{i}.mp4", "libx264", 64, 48, 12, 12))
    pq.write_table(pa.table({"path": [str(p.relative_to(tmp_path)) for p in paths],
                             "label": ["7" if i % 2 else "3" for i in range(5)]}), tmp_path / "train.parquet")
    out = tmp_path / "out"
    shard({"train": tmp_path / "train.parquet", "val": f"{vids}/c1/*.mp4"}, out, "shard.max_samples=2")
    m = read_manifest(str(out))
    assert [(s["name"], s["samples"]) for s in m.shards] == [
        ("train-000000.tar", 2), ("train-000001.tar", 2), ("train-000002.tar", 1), ("val-000000.tar", 2)]
    rows = m.samples.to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    assert [r["source"] for r in train] == [str(p) for p in paths]  # list order kept
    assert [r["label_index"] for r in train] == [3, 7, 3, 7, 3]  # integer labels keep their value
    assert all(r["label"] is None and r["cls_size"] == -1 for r in rows if r["split"] == "val")


@pytest.mark.slow
def test_fsspec_urls(tmp_path, monkeypatch):
    """A memory:// list file naming file:// videos and a memory:// one, into a memory:// output; a file://
    folder split too. Workers are spawned processes with their own (empty) memory filesystem: the parent reads
    memory:// inputs for them (they used to be rejected as unreadable)."""
    vids = tmp_path / "v"
    a = videos.write_video(vids / "a.mp4", "libx264", 64, 48, 12, 12)
    b = videos.write_video(vids / "b.webm", "libvpx-vp9", 64, 48, 12, 12)
    fs = fsspec.filesystem("memory")
    tag = f"tubelet-test-{os.getpid()}-{time.time_ns()}"
    fs.pipe_file(f"/{tag}/v/c.mp4", a.read_bytes())  # a video in memory://: the parent reads it for a worker
    with fs.open(f"/{tag}/lists/train.csv", "w") as f:
        f.write(f"path,label\nfile://{a},x\nfile://{b},y\n../v/c.mp4,z\n")
    out = f"memory://{tag}/out"
    systmp = tmp_path / "systmp"  # where shards are assembled for a remote output
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    try:
        shard({"train": f"memory://{tag}/lists/train.csv", "val": f"file://{vids}"}, out)
        assert not list(systmp.iterdir())  # cleaned up
        m = read_manifest(out)
        verify(m.root, check_hashes=True)
        rows = m.samples.to_pylist()
        assert [(r["split"], r["label"]) for r in rows] == [("train", "x"), ("train", "y"), ("train", "z"),
                                                           ("val", None), ("val", None)]
        assert rows[0]["source"] == f"file://{a}" and rows[2]["source"] == fs.unstrip_protocol(f"/{tag}/v/c.mp4")
        assert read_rejects(out).num_rows == 0
        assert m.classes == ["x", "y", "z"]
        assert fs.exists(f"/{tag}/out/_parts/train-000000.json")
        assert not [p for p in fs.ls(f"/{tag}/out", detail=False) if ".lock" in p]  # released
        data = fs.cat_file(f"/{tag}/out/{rows[0]['shard']}")
        video = data[rows[0]["video_offset"]:rows[0]["video_offset"] + rows[0]["video_size"]]
        assert len(videos.decode_rgb(video)) == 12
    finally:
        fs.rm(f"/{tag}", recursive=True)


# ----------------------------------------------------------------------------------------------------
# determinism, resume, partitions, locking: one reference set


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    src = d / "in"
    fmts = [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".avi", "mpeg4"), (".mov", "mjpeg")]
    for i in range(8):
        ext, codec = fmts[i % 4]
        videos.write_video(src / f"cls{i % 2}/v{i}{ext}", codec, 96, 64, 12, 24)
    # rejects must be deterministic too; these two make up group 2 alone: a group without a shard
    videos.write_empty(src / "cls0/zz_empty1.mp4")
    videos.write_not_video(src / "cls0/zz_text.mp4")
    overrides = ("labels_from_dirs=true", "shard.max_samples=2")
    out = d / "out"
    shard({"train": src}, out, *overrides)
    return {"inputs": {"train": src}, "overrides": overrides, "out": out}


@pytest.mark.slow
def test_deterministic_across_runs(ref, tmp_path):
    out = tmp_path / "again"
    shard(ref["inputs"], out, *ref["overrides"], workers=1)  # other folder, other worker count
    assert_same_manifest(ref["out"], out)
    m = read_manifest(str(out))
    assert [s["name"] for s in m.shards] == ["train-000000.tar", "train-000001.tar", "train-000003.tar",
                                             "train-000004.tar"]
    assert m.meta["summary"]["rejected"] == {"empty_file": 1, "not_a_video": 1}


@pytest.mark.slow
def test_a_damaged_set_repairs_itself_on_rerun(ref, tmp_path, capsys):
    """Flipped bytes, a truncated shard, a lost index: verify lists every bad shard, and rerunning make shards
    rebuilds exactly the damaged groups (deterministic bytes), after which the set verifies again."""
    out = tmp_path / "set"
    shutil.copytree(ref["out"], out)
    m = read_manifest(str(out))
    a, b, c = m.shards[:3]
    with open(out / a["name"], "r+b") as f:  # same size, other bytes
        f.seek(a["bytes"] // 2)
        f.write(b"\xff" * 64)
    with open(out / b["name"], "r+b") as f:
        f.truncate(b["bytes"] - 512)
    os.unlink(out / c["index"])
    with pytest.raises(ManifestError) as e:
        verify(m.root, check_hashes=True)
    assert str(e.value).startswith(f"3 of {len(m.shards)} shards of {out} do not match")
    for sh in (a, b, c):
        assert f"shard {sh['name']}:" in str(e.value)
    res = shard(ref["inputs"], out, *ref["overrides"])
    assert res["summary"]["videos_processed"] == 6  # three groups of two videos, nothing else
    err = capsys.readouterr().err
    assert all(f"shard {sh['name']}:" in err for sh in (a, b, c)) and "rebuilding it" in err
    verify(str(out), check_hashes=True)
    assert_same_manifest(ref["out"], out)
    again = shard(ref["inputs"], out, *ref["overrides"])  # a rerun of a whole, healthy set does no work
    assert again["summary"]["videos_processed"] == 0 and "nothing to do" in again["printed"]


def test_bad_output_inputs_and_overrides_are_one_clear_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    videos.write_not_video(src / "a.mp4")
    videos.write_empty(src / "b.mp4")
    (tmp_path / "file").write_text("x")
    base = ["progress=false", "workers=1"]
    cases = [
        ([f"inputs.train={src}", f"output={tmp_path / 'file'}"], "error: output .*file is \\(or lies under\\) a file"),
        (["inputs.train=", f"output={tmp_path / 'o1'}"], "config error: inputs.train: is empty"),
        ([f"inputs.train={src}", f"output={tmp_path / 'o2'}", "transcode.crf=abc"],
         "config error: override 'transcode.crf=abc'"),
        ([f"inputs.train={src}", f"output={tmp_path / 'o3'}"],
         "error: no input was sharded: all 2 were rejected \\(empty_file: 1, not_a_video: 1\\)"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert re.match(message, err[-1]), (message, err)
        assert not [ln for ln in err if "Traceback" in ln]
    assert (tmp_path / "o3" / "rejects.parquet").exists()  # the reasons stay readable


def _children(pid: int) -> list:
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_resume_after_kill_9(ref, tmp_path):
    out = tmp_path / "out"
    args = [f"inputs.train={ref['inputs']['train']}", f"output={out}", "workers=1", "progress=false",
            *ref["overrides"]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([PY, "-m", "shards.make_shards", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "_parts"
    deadline = time.time() + 180
    kids = []
    while time.time() < deadline and proc.poll() is None:
        kids = _children(proc.pid) or kids
        if parts.is_dir() and any(p.name.startswith("train-") and p.suffix == ".json" for p in parts.iterdir()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    kids = _children(proc.pid) or kids
    assert kids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # the spawned workers (and multiprocessing's resource tracker) must not outlive their parent
    deadline = time.time() + 60
    while time.time() < deadline and [k for k in kids if _alive(k)]:
        time.sleep(0.05)
    lingering = [k for k in kids if _alive(k)]
    for k in lingering:
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGKILL)
    assert not lingering, "worker processes outlived the killed `make shards`"

    finished = sorted(p.stem for p in parts.glob("*.json"))
    assert 1 <= len(finished) < 5, finished
    assert not (out / "manifest.parquet").exists()
    # nothing partial under a final name: every tar is complete, every index and record parses
    for t in out.glob("*.tar"):
        assert t.stat().st_size % 10240 == 0
        for name, data in members(t):
            assert data is not None
        idx = t.with_suffix(".idx")
        if idx.exists() and t.stem in finished:
            assert idx.read_text() == wds2idx_text(t, tmp_path)
    for i in out.glob("*.idx"):
        parse_index(i.read_text())
    records = {g: json.loads((parts / f"{g}.json").read_text()) for g in finished}
    for rec in records.values():
        for sh in rec["shards"]:
            assert (out / sh["name"]).stat().st_size == sh["bytes"]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for g, rec in records.items()
              for p in [parts / f"{g}.json"] + [out / sh[k] for sh in rec["shards"] for k in ("name", "index")]}

    res = shard(ref["inputs"], out, *ref["overrides"], workers=1)  # restart
    assert res["summary"]["sharded"] == 8
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stamps} == stamps  # not redone
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]
    assert_same_manifest(ref["out"], out)


@pytest.mark.slow
def test_partitions_then_merge(ref, tmp_path):
    out = tmp_path / "out"
    r0 = shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", "partition.index=0")
    assert r0["summary"] is None and "partition 0/2" in r0["printed"]
    assert not (out / "manifest.parquet").exists()
    assert sorted(p.stem for p in (out / "_parts").glob("*.json")) == ["train-000000", "train-000002",
                                                                       "train-000004"]
    with pytest.raises(ShardsError, match=r"2 groups are not finished \(train-000001, train-000003\)"):
        shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", "merge=true")
    assert not (out / "manifest.parquet").exists()
    shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", "partition.index=1")
    shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", "merge=true")
    assert_same_manifest(ref["out"], out)
    verify(str(out), check_hashes=True)


def test_inputs_listed_once_and_each_partition_reads_only_its_groups(ref, tmp_path, monkeypatch):
    """`list_only=true` lists the inputs once (`_parts/inputs/`); partition jobs then list nothing and read only
    their own groups' record batches from it, and the merge streams them all: the same set as a single run."""
    import shards.plan as plan_mod

    out = tmp_path / "out"
    r = shard(ref["inputs"], out, *ref["overrides"], "list_only=true")
    assert r["summary"] is None and not tars(out)
    assert (out / "_parts/inputs/listing.json").exists() and (out / "_parts/inputs/listing.arrow").exists()

    def no_listing(*a, **k):
        raise AssertionError("a job listed the inputs again")

    monkeypatch.setattr(plan_mod, "split_chunks", no_listing)
    read = []
    real_group = plan_mod.Plan.group
    monkeypatch.setattr(plan_mod.Plan, "group", lambda self, b: read.append(b) or real_group(self, b))
    for i in range(2):
        read.clear()
        shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", f"partition.index={i}")
        assert sorted(read) == [b for b in range(5) if b % 2 == i]  # groups 0..4: train-000000 .. 000004
    read.clear()
    shard(ref["inputs"], out, *ref["overrides"], "partition.count=2", "merge=true")
    assert read == list(range(5))
    assert_same_manifest(ref["out"], out)
    # other settings make a new listing (and the groups' fingerprints then refuse the finished set)
    monkeypatch.undo()
    with pytest.raises(ShardsError, match="other inputs or settings"):
        shard(ref["inputs"], out, "shard.max_samples=3", "labels_from_dirs=true")
    assert json.loads((out / "_parts/inputs/listing.json").read_text())["spec"]["max_samples"] == 3


def test_an_input_listed_twice_is_one_error_naming_it(tmp_path, capsys):
    src = videos.write_video(tmp_path / "a.webm", "libvpx-vp9", 64, 48, 12, 12)
    (tmp_path / "list.csv").write_text(f"path\n{src}\nother.webm\n{src}\n")
    args = [f"inputs.train={tmp_path / 'list.csv'}", f"output={tmp_path / 'out'}", "progress=false", "workers=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src} appears twice in the input" in err[0], err
    assert not tars(tmp_path / "out")


@pytest.mark.slow
def test_second_run_into_locked_output_is_refused(ref, tmp_path, capsys):
    out = tmp_path / "out"
    holder = Output(str(out))
    holder.lock("0-of-1")
    try:
        args = [f"inputs.train={ref['inputs']['train']}", f"output={out}", "progress=false", "workers=1"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "another `make shards` is writing" in err and f"pid={os.getpid()}" in err
        assert not list(out.glob("*.tar"))
    finally:
        holder.unlock()
    # once released, a run goes through
    assert main(args) == 0


@pytest.mark.slow
def test_changed_config_into_existing_output_is_refused(ref, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ref["out"], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    args = [f"inputs.train={ref['inputs']['train']}", f"output={out}", "progress=false", "workers=1",
            *ref["overrides"], "transcode.crf=20"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "made from other inputs or settings" in err and "train-000000" in err
    assert {p: p.stat().st_mtime_ns for p in before} == before


# ----------------------------------------------------------------------------------------------------
# crash isolation


class _KillsWorker:
    """Unpickling this in the worker ends the worker process on the spot, as a decoder segfault would."""

    def __reduce__(self):
        return (os._exit, (9,))


@pytest.mark.slow
def test_worker_crash_is_isolated(tmp_path):
    good = [videos.write_video(tmp_path / f"g{i}.webm", "libvpx-vp9", 64, 48, 12, 12) for i in range(3)]
    jobs = [(i, Job(f"g{i}", str(p), None, None)) for i, p in enumerate(good)]
    jobs.insert(1, ("boom", Job("boom", str(good[0]), None, None, TranscodeConfig(), _KillsWorker())))
    results = {}
    run_jobs(jobs, 2, lambda tag, r: results.__setitem__(tag, r))
    assert set(results) == {0, 1, 2, "boom"}
    assert isinstance(results["boom"], Reject) and results["boom"].reason == "decoder_crash"
    assert all(isinstance(results[i], Sample) and results[i].meta["nframes"] == 12 for i in range(3))


@pytest.mark.slow
def test_class_indices_shifted_by_a_new_class_are_not_reused(tmp_path, capsys):
    """Adding a split whose new class renumbers the classes must not keep shards with the old numbers."""
    for cls in ("b", "c"):
        videos.write_video(tmp_path / f"train/{cls}/v.mp4", "libx264", 64, 48, 12, 12)
    videos.write_video(tmp_path / "val/a/v.mp4", "libx264", 64, 48, 12, 12)
    out = tmp_path / "out"
    base = [f"inputs.train={tmp_path / 'train'}", f"output={out}", "progress=false", "workers=1",
            "labels_from_dirs=true"]
    assert main(base) == 0
    assert read_manifest(str(out)).samples.column("label_index").to_pylist() == [0, 1]
    before = (out / "manifest.parquet").read_bytes()
    # classes become a, b, c: the finished train group was numbered a=0, b=1 and would have to be rewritten
    assert main(base + [f"inputs.val={tmp_path / 'val'}"]) == 2
    assert "made from other inputs or settings" in capsys.readouterr().err
    assert (out / "manifest.parquet").read_bytes() == before  # the finished set is left as it was


def test_h264_decode_check_falls_back_to_pyav_on_cpu(tmp_path):
    from shards.validate import cuda_available

    path = videos.write_video(tmp_path / "v.webm", "libvpx-vp9", 64, 48, 12, 12)
    ok = process(Job("k", str(path), None, None, TranscodeConfig(codec="h264"), FilterConfig()))
    assert isinstance(ok, Sample) and ok.ext == "mp4" and ok.meta["nframes"] == 12
    forced = process(Job("k", str(path), None, None, TranscodeConfig(codec="h264"), FilterConfig(decode_check="dali")))
    if cuda_available():  # DALI's GPU decoder reads H.264: the forced DALI check passes
        assert isinstance(forced, Sample) and forced.video == ok.video, forced
    else:  # DALI's CPU decoder has no H.264: forcing it must fail cleanly (a reject), not crash
        assert isinstance(forced, Reject) and forced.reason == "validation_failed" and "DALI" in forced.detail, forced


def test_the_decode_check_uses_the_gpu_only_for_codecs_the_cpu_decoder_lacks(monkeypatch):
    """VP9 (the default) is checked with DALI's CPU decoder even on a GPU host: no shard worker makes a CUDA
    context for it; H.264 needs NVDEC (none here: PyAV only)."""
    import shards.validate as v

    monkeypatch.setattr(v, "cuda_available", lambda: True)
    assert [v.dali_device_for(c) for c in ("vp9", "mjpeg", "h264")] == ["cpu", "cpu", "mixed"]
    monkeypatch.setattr(v, "cuda_available", lambda: False)
    assert v.dali_device_for("vp9") == "cpu" and v.dali_device_for("h264") is None and not v.dali_can_decode("hevc")


def test_validate_video_counts_and_checks_frames(tmp_path):
    from shards.validate import validate_video

    path = videos.write_video(tmp_path / "v.webm", "libvpx-vp9", 64, 48, 12, 13)
    data = path.read_bytes()
    assert validate_video(data, "vp9") == (13, (48, 64))  # counts first, then checks 0, 6, 12 with DALI
    assert validate_video(data, "vp9", expected=13) == (13, (48, 64))
    assert validate_video(data, "vp9", expected=20)[0] == 13  # a wrong count is returned for the caller
    for broken in (data[:len(data) // 3], b"not a video" * 10):
        with pytest.raises(Rejected) as e:
            validate_video(broken, "vp9")
        assert e.value.reason == "validation_failed"


def _as_format_2(root) -> None:
    """Rewrite a set the way tubelet wrote it before format 3: every sample in manifest.parquet, the shards table
    in its schema metadata, no samples.arrow."""
    import json

    import pyarrow.parquet as pq

    m = read_manifest(str(root))
    shards = [{k: sh[k] for k in ("name", "index", "split", "bytes", "samples", "sha256")} for sh in m.shards]
    meta = {k: v for k, v in m.meta.items() if k != "rows"}
    meta.update(format_version=2, shards=shards)
    rows = m.samples.take(list(range(m.samples.num_rows))[::-1])  # any row order: the upgrade sorts by shard
    pq.write_table(rows.replace_schema_metadata({b"tubelet": json.dumps(meta).encode()}), root / "manifest.parquet")
    (root / "samples.arrow").unlink()


def test_a_set_of_the_previous_format_names_the_upgrade_and_upgrades_in_place(small_shards, tmp_path):
    """A format-2 set fails to open with one line naming `tubelet-upgrade`; that command rewrites it in place
    (shards untouched) and the loader then reads the same samples; a second run leaves it as it is."""
    from pipeline.split_index import open_split
    from shards.upgrade import main as upgrade_main

    root = tmp_path / "old"
    shutil.copytree(small_shards, root)
    before = read_manifest(str(root))
    tars = {sh["name"]: (root / sh["name"]).read_bytes() for sh in before.shards}
    _as_format_2(root)
    with pytest.raises(ManifestError, match=f"format 2 .* `tubelet-upgrade root={root}`"):
        open_split(str(root), "train")
    assert upgrade_main([f"root={root}"]) == 0
    after = read_manifest(str(root))
    assert after.samples.to_pylist() == before.samples.to_pylist() and after.shards == before.shards
    assert after.meta == before.meta
    assert {n: (root / n).read_bytes() for n in tars} == tars
    assert sorted(open_split(str(root), "train").keys) == sorted(open_split(small_shards, "train").keys)
    verify(after.root, check_hashes=True)
    assert upgrade_main([f"root={root}"]) == 0  # already upgraded: nothing to do
