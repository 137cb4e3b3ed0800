"""The benchmarks run end to end on this machine: `make bench-loader` (small inputs), `make gpu-check`'s CPU smoke
mode (the same script a GPU session runs: the GPU tests, bench-gpu, bench-train) and `make bench-remote`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    """bench_gpu's inputs and shard sets, made by the first smoke run and reused by the next."""
    return tmp_path_factory.mktemp("bench-gpu-cache")


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_writes_each_row_as_it_goes(tmp_path, gpu_cache):
    """`make gpu-check ARGS=smoke`: the GPU session's one script, on the CPU with tiny settings. Versions first,
    then every step in order with its outcome; bench-gpu's rows (the GPU-only ones saying why they were not
    measured), bench-train's rows with the bounded largest-batch search."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "OUT": str(out), "PY": sys.executable,
                                                        "CACHE": str(gpu_cache)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    versions = (out / "versions.txt").read_text()
    assert f"torch {torch.__version__}" in versions and "nvidia.dali 2." in versions
    steps = [ln.split("\t") for ln in (out / "steps.tsv").read_text().splitlines()]
    assert [(name, what) for name, what, _ in steps] == [("tests", "ok"), ("bench-gpu", "ok"), ("bench-train", "ok")]
    assert "skipped" in (out / "tests.txt").read_text()  # no GPU here: the GPU tests skip, and say so

    bench = out / "bench-gpu"
    first, *rows = [json.loads(ln) for ln in (bench / "rows.jsonl").read_text().splitlines()]
    assert first["versions"]["dali"] and first["versions"]["torch"] == torch.__version__  # before any row
    gpu_only = ["decoders.video mixed, H.264", "decoders.video mixed, VP9",
                "readers.video gpu (legacy), H.264, 4 pipelines", "PyNvVideoCodec, H.264, 8 threads"]
    from benchmarks.peers import availability

    measured = ["decoders.video cpu, VP9", "joint loop: decoders.video cpu, VP9 -> ViT-tiny/16 step",
                "decoders.image_slice cpu, JPEG 160x120, batch 8",
                "joint loop: decoders.image_slice cpu, JPEG 160x120, batch 8 -> I-JEPA ViT-tiny/8 step"]
    peer = "torchcodec cpu, raw H.264 files"  # the GPU row's code, with torchcodec's CPU decoder
    assert sorted(r["name"] for r in rows) == sorted(gpu_only + measured + [peer])
    by_name = {r["name"]: r for r in rows}
    if availability("torchcodec")[0] is not None:
        assert by_name[peer]["clips_per_s"] > 0 and by_name[peer]["decoded_frames_per_s"] > 0
    else:  # an optional extra: the row says why
        assert "torchcodec" in by_name[peer]["error"]
    assert all(by_name[n]["error"] == "not measured: needs a GPU (smoke run)" for n in gpu_only)
    assert all("error" not in by_name[n] and by_name[n]["clips_per_s"] > 0 for n in measured)
    assert by_name[measured[0]]["decoded_frames_per_s"] > 0 and 0 <= by_name[measured[1]]["data_wait_share"] < 1
    table = (bench / "table.md").read_text()
    assert "| decoders.video cpu, VP9 |" in table and "| PyNvVideoCodec, H.264, 8 threads | not measured" in table
    assert json.loads((bench / "versions.json").read_text())["dali"]

    train = json.loads((out / "bench-train.json").read_text())
    assert [(r["size"], r["max_batch"], r["max_batch_exact"]) for r in train["rows"]] == [("tiny", 4, True)]
    assert train["rows"][0]["clips_per_second"] > 0 and train["machine"]["torch"] == torch.__version__


@pytest.mark.slow
def test_bench_gpu_keeps_going_when_a_row_or_its_inputs_fail(tmp_path, monkeypatch, gpu_cache):
    """A row whose inputs cannot be made, or whose code raises an exception without a message, is a failed row
    with its reason; the rows after it are still measured, and the NVML sampler's death is a column note."""
    import benchmarks.bench_gpu as bg

    def no_images(*a, **k):
        raise RuntimeError()  # an empty message

    monkeypatch.setattr(bg, "image_set", no_images)
    out = tmp_path / "out"
    assert bg.main(["smoke=true", f"out={out}", f"cache={gpu_cache}", "batches=1", "train_steps=1"]) == 0
    rows = {r.get("name"): r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert rows["decoders.image_slice cpu, JPEG 160x120, batch 8"]["error"] == "RuntimeError"
    assert rows["decoders.video cpu, VP9"]["clips_per_s"] > 0  # the video rows did not depend on it
    assert "failed: RuntimeError" in (out / "table.md").read_text()

    class DyingNvml:  # samples once, then fails: the row keeps its clips/s and says why NVML's columns are short
        calls = 0

        def nvmlDeviceGetDecoderUtilization(self, handle):
            DyingNvml.calls += 1
            if DyingNvml.calls > 1:
                raise OSError("NVML went away")
            return (50, 200000)

        def nvmlDeviceGetUtilizationRates(self, handle):
            return type("U", (), {"gpu": 90})()

    use = bg.Usage(torch.device("cpu"))
    use.nvml, use.handle = DyingNvml(), None
    with use:
        deadline = time.monotonic() + 60
        while use.error is None and time.monotonic() < deadline:  # the sampler polls every 0.2 s
            time.sleep(0.05)
    cols = use.columns()
    assert cols["nvdec_pct"] == 50 and cols["nvml_error"] == "OSError: NVML went away"


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


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path):
    """`make bench-scale` end to end on a tiny set (2,500 samples, 3 shards): the merge writes the O(shards)
    manifest, every measurement runs in its own process and reports, and through the local S3 server a node's
    second rank reads the manifest from the node's copy (fewer requests and bytes than the first)."""
    from benchmarks.bench_scale import main

    out = tmp_path / "scale.json"
    assert main(["rows=2500", f"dir={tmp_path / 'sets'}", "steps=5", "s3=true", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["new"]
    assert not [k for k, v in r.items() if "error" in v], r
    assert r["open"]["rows"] == 2500 and r["first_step"]["first_rows"] == 32
    assert set(r["merge"]["files_bytes"]) == {"manifest.parquet", "samples.arrow", "rejects.parquet"}
    first, second = r["s3"]["first_rank"], r["s3"]["second_rank"]
    assert "error" not in first and "error" not in second, r["s3"]
    assert second["bytes"] < first["bytes"] and second["requests"] <= first["requests"]
