"""The loader benchmarks run end to end on this machine: `make bench-loader` (small inputs) and `make bench-gpu`'s
CPU smoke mode, the same script a GPU session runs."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.mark.slow
def test_bench_loader_rows(tmp_path, monkeypatch):
    """Every row of both input kinds, the peers on the raw files beside tubelet on their shard sets; a peer that
    is not installed (torchcodec here) is a row that says so, not a crash."""
    from benchmarks.bench_loader import main
    from benchmarks.peers import availability

    if availability("decord")[0] is None:  # `make setup` installs it; where it could not, it must be reported
        pytest.skip(f"decord {availability('decord')[1]}")
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    out = tmp_path / "rows.json"
    assert main(["videos=2", "seconds=3", "size=192x108", "batches=2", "workers=2", f"cache={tmp_path / 'cache'}",
                 "data.num_frames=8", "data.crop_size=64", "data.batch_size=2", "images=6", "image_size=160x120", "image_batch=2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["inputs"], r["name"]): r for r in result["rows"]}
    assert len(rows) == 2 * 6 + 2
    ran = [r for r in rows.values() if "error" not in r]
    assert len(ran) == 2 * 5 + 2 and all(r["clips_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in ran)
    assert rows["images", "images (JPEG), DALI"]["decoded_frames_per_clip"] == 1
    assert result["sets"]["images"]["images"] == 6
    for kind in ("generated", "reencoded"):
        today, stepped, aligned = [r["decoded_frames_per_clip"] for r in result["rows"] if r["inputs"] == kind][:3]
        # 8 frames at stride 4 over every frame, keyframes every 16: 29 frames spanned, half a GOP more on average;
        # stored every 4th frame: 8 frames plus up to 15 before the first; starts on keyframes: exactly 8
        assert today > 2 * stepped and stepped <= 8 + 15 and aligned == 8
        sets = result["sets"][kind]
        assert sets["today"]["frame_step"] == 1 and sets["stepped"]["frame_step"] == 4
        assert sets["stepped"]["bytes_per_video_second"] < sets["today"]["bytes_per_video_second"]
        assert (sets["today"]["size"], sets["stepped"]["size"]) == ("192x108", "176x96")  # whole macroblocks
        # the raw files: 90 frames, x264's default GOP (250) holds all of them; never upscaled by the re-encode
        assert sets["raw"]["size"] == "192x108" and sets["raw"]["keyframes_per_video"] == 1 and sets["raw"]["b_frames"]
        decord = rows[kind, "decord, as the official V-JEPA loader, raw files"]
        # one GOP: a seeking decoder decodes from frame 0 through the clip's last frame
        assert decord["set"] == "raw" and decord["min_decoded_frames_per_clip"] >= 29
        assert rows[kind, "torchcodec, raw files"]["error"] == "not installed"
        ratios = result["ratios"][kind]
        assert ratios["stepped/torchcodec"] is None and ratios["stepped/decord"] > 0 and ratios["today/decord"] > 0
        payoff = result["payoff"][kind]
        assert payoff["faster_peer"] == "decord" and payoff["shard_cpu_s_per_video"] > 0
    assert result["versions"]["torchcodec"] == "not installed" and result["versions"]["decord"] == "0.6.0"


@pytest.mark.slow
def test_bench_gpu_smoke_writes_every_row_as_it_goes(tmp_path):
    from benchmarks.bench_gpu import main

    out = tmp_path / "out"
    assert main(["smoke=true", f"out={out}", f"cache={tmp_path / 'cache'}", "batches=2", "train_steps=2"]) == 0
    rows = [json.loads(ln) for ln in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [
        "decoders.video cpu, VP9", "joint loop: decoders.video cpu, VP9 -> ViT-tiny/16 step",
        "decoders.image_slice cpu, JPEG 160x120, batch 8",
        "joint loop: decoders.image_slice cpu, JPEG 160x120, batch 8 -> I-JEPA ViT-tiny/8 step"]
    assert all("error" not in r and r["clips_per_s"] > 0 for r in rows)
    assert rows[0]["decoded_frames_per_s"] > 0 and 0 <= rows[1]["data_wait_share"] < 1
    assert "| decoders.video cpu, VP9 |" in (out / "table.md").read_text()
    assert json.loads((out / "versions.json").read_text())["dali"]


@pytest.mark.slow
def test_bench_remote_small(tmp_path):
    """`make bench-remote` end to end on a small set: an epoch from the local S3 server through a cache smaller
    than the set, within the download and cache limits, and exact after kill -9."""
    from benchmarks.bench_remote import main

    out = tmp_path / "remote.json"
    assert main(["videos=16", "seconds=2", "size=192x108", "shard_samples=2", "cache_fraction=0.4", "kill_after=2",
                 "data.num_frames=8", "data.crop_size=64", "data.batch_size=2", f"cache={tmp_path / 'cache'}",
                 "quality_samples=2048", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["shards"] == 8 and r["resume_exact"] and r["killed_after_batches"] >= 2
    assert 0 < r["peak_cache_bytes"] <= r["cache_max_bytes"] < r["set_bytes"]
    assert r["downloaded_over_set"][1] <= 1.5 and r["cache"][1]["evictions"] > 0  # a tiny set: read-ahead weighs
    quality = {q["order"]: q for q in r["shuffle_quality"]}
    assert quality["global"]["distinct_labels"] > quality["window 1, canonical nodes 1"]["distinct_labels"]
