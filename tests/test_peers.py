"""The peers of `make bench-loader` (benchmarks/peers.py): the official V-JEPA loader's decord path and torchcodec
read the clips the sampling names from the raw files, through the official transform, with the masks; a peer that
is missing is reported, not a crash."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import PEERS, PeerLoader, availability, min_decoded_frames, official_transform, probe_raw
from pipeline.clips import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config import LoaderConfig
from pipeline.reference import decode_frames
from pipeline.sampling import ClipRecord, frame_indices


def _encode(path: Path, frames: int, gop: int, w: int = 96, h: int = 64) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w + frames, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"g": str(gop), "bf": "2", "x264-params": "scenecut=0", "preset": "ultrafast"}
        for i in range(frames):
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, i:i + w]), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("peers") / "gop20.mp4"
    _encode(path, 90, gop=20)
    return path


def test_probe_finds_the_frames_keyframes_and_b_frames_and_the_least_a_seeking_decoder_decodes(video):
    v = probe_raw(str(video))
    assert (v.nframes, v.width, v.height, v.fps) == (90, 96, 64, 30.0)
    assert v.keyframes == (0, 20, 40, 60, 80) and v.b_frames
    assert min_decoded_frames(v, [45, 49, 53]) == 53 - 40 + 1  # from the keyframe at or before 45
    assert min_decoded_frames(v, [60, 64]) == 5 and min_decoded_frames(v, [19]) == 20


def test_the_official_transform_crops_flips_and_normalises_like_the_official_code():
    frames = torch.randint(0, 256, (3, 40, 50, 3), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255
    window = frames[:, 5:37, 10:42].permute(3, 0, 1, 2).float()  # C T H W, a 32x32 crop: no resize
    out = official_transform(frames, ClipRecord(0, (5, 10, 32, 32), False), 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, (window - mean) / std)
    torch.testing.assert_close(official_transform(frames, ClipRecord(0, (5, 10, 32, 32), True), 32),
                               ((window - mean) / std).flip(-1))
    # a resize is the official one: bilinear, not antialiased (tubelet's clips are antialiased)
    whole = frames.permute(3, 0, 1, 2).float()
    plain = F.interpolate(whole, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(official_transform(frames, ClipRecord(0, (0, 0, 40, 50), False), 16),
                               (plain - mean) / std)


@pytest.mark.parametrize("peer", PEERS)
def test_a_peer_reads_the_sampled_frames_of_the_raw_files_with_the_masks(peer, video):
    if availability(peer)[0] is None:
        pytest.skip(f"{peer} {availability(peer)[1]}")
    v = probe_raw(str(video))
    cfg = replace(LoaderConfig(), batch_size=2, num_frames=8, frame_stride=4, crop_size=32)
    loader = PeerLoader(peer, [v, v], cfg, grid=(4, 4, 4), workers=1)
    batches = list(loader.batches(2))
    data = video.read_bytes()
    decoded = 0
    for b in batches:
        assert b.clips.shape == (2, 3, 8, 32, 32) and len(b.masks) == len(cfg.masks)
        for clip, rec in zip(b.clips, b.records):
            indices = frame_indices(rec.start, v.nframes, cfg.num_frames, cfg.frame_stride)
            frames, _ = decode_frames(data, indices)  # PyAV from the first frame: the frames FFmpeg decodes
            torch.testing.assert_close(clip, official_transform(torch.from_numpy(frames), rec, 32))
            decoded += min_decoded_frames(v, indices)
        for context, target in b.masks:  # token indices of the 4x4x4 grid, disjoint per clip
            assert context.shape[0] == target.shape[0] == 2 and int(max(context.max(), target.max())) < 64
            for c, t in zip(context.tolist(), target.tolist()):
                assert not set(c) & set(t)
    assert loader.min_decoded_frames == decoded
    assert len({(r.start, r.crop, r.flip) for b in batches for r in b.records}) > 1  # drawn per clip


def test_a_missing_peer_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now fails as when it is not installed
    assert availability("decord") == (None, "not installed")
    with pytest.raises(RuntimeError, match="decord not installed"):
        PeerLoader("decord", [], LoaderConfig())
