"""pipeline.gops: a clip's GOPs cut out of a sharded WebM decode to exactly the frames of the whole video, and
what cannot be cut exactly is left whole."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import load_config
from pipeline import gops
from pipeline.config import LoaderConfig
from pipeline.loader import VideoLoader
from pipeline.sampling import decoded_frames, frame_indices

KEYFRAMES = 8  # transcode.keyframe_interval of the set below
NUM_FRAMES, STRIDE = 6, 2


@pytest.fixture(scope="module")
def gop_set(tmp_path_factory) -> str:
    """`make shards` of two noise videos (every GOP above the 4 kB after which FFmpeg's muxer starts a cluster on
    a keyframe): 44 and 37 frames, a keyframe every 8."""
    from shards.build import run
    from shards.config import ShardsConfig
    from videos import write_video

    root = tmp_path_factory.mktemp("gops")
    for i, n in enumerate((44, 37)):
        write_video(root / "in" / f"noise{i}.webm", "libvpx-vp9", 96, 64, 24, n, pattern="noise")
    cfg = load_config(ShardsConfig, None, [f"inputs.train={root / 'in'}", f"output={root / 'shards'}", "workers=1",
                                           "progress=false", f"transcode.keyframe_interval={KEYFRAMES}"])
    run(cfg)
    return str(root / "shards")


def samples(root: str):
    """(encoded bytes, frame count) of every sample of the set, as the loader reads them."""
    loader = VideoLoader(load_config(LoaderConfig, None, [f"root={root}", "batch_size=1"]))
    try:
        return [(loader.index.read_video(loader.store, r), loader.index.nframes(r)) for r in range(len(loader.index))]
    finally:
        loader.close()


def decode(videos, starts) -> list:
    """DALI's CPU decoder on each (bytes, start): NUM_FRAMES frames at STRIDE, edge padding, as the loader asks."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(videos), num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def graph():
        data, start = fn.external_source(
            source=lambda: ([np.frombuffer(v, np.uint8) for v in videos], [np.array(s, np.int32) for s in starts]),
            num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
        return fn.decoders.video(data, device="cpu", start_frame=start, sequence_length=NUM_FRAMES, stride=STRIDE,
                                 pad_mode="edge")

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(videos))]


def test_clusters_begin_on_the_sets_keyframes(gop_set):
    for data, nframes in samples(gop_set):
        lay = gops.layout(data, nframes)
        assert lay is not None
        assert [c.first_frame for c in lay.clusters] == list(range(0, nframes, KEYFRAMES))
        assert all(c.keyframe for c in lay.clusters) and sum(c.frames for c in lay.clusters) == nframes


def test_every_clip_decodes_from_its_slice_to_the_frames_of_the_whole_video(gop_set):
    for data, nframes in samples(gop_set):
        lay = gops.layout(data, nframes)
        whole, cut, firsts = [], [], []
        for start in range(nframes):  # the last starts run past the end: padded with the last frame
            last = frame_indices(start, nframes, NUM_FRAMES, STRIDE)[-1]
            part, first = gops.clip_slice(data, lay, start, last)
            assert first == start - start % KEYFRAMES  # the keyframe at or before the clip
            assert last - first + 1 == decoded_frames(start, nframes, NUM_FRAMES, STRIDE, KEYFRAMES)
            assert (part is data) == (first == 0 and last >= (nframes - 1) // KEYFRAMES * KEYFRAMES)
            whole.append((data, start))
            cut.append((part, start - first))
            firsts.append(first)
        got = decode(*zip(*cut))
        for start, (a, b) in enumerate(zip(decode(*zip(*whole)), got, strict=True)):
            assert a.shape == b.shape == (NUM_FRAMES, 64, 96, 3)
            assert np.array_equal(a, b), f"start {start} (slice from frame {firsts[start]}) differs"


def test_a_video_that_cannot_be_cut_exactly_is_left_whole(gop_set, tmp_path):
    from videos import write_video

    data, nframes = samples(gop_set)[0]
    assert gops.layout(data, nframes + 1) is None  # the blocks must add up to the index's frame count
    assert gops.layout(data[: len(data) // 2], nframes) is None  # truncated
    mp4 = write_video(tmp_path / "a.mp4", "libx264", 64, 48, 12, 12).read_bytes()
    assert gops.layout(mp4, 12) is None  # not Matroska
    lay = gops.layout(data, nframes)
    second = lay.clusters[1]
    laced = bytearray(data)
    flags = _first_block_flags(data, second)
    laced[flags] |= 0x02  # Xiph lacing: several frames in one block, which the frame count cannot follow
    assert gops.layout(bytes(laced), nframes) is None


def _first_block_flags(data: bytes, cluster: gops.Cluster) -> int:
    """Offset of the flags byte of `cluster`'s first SimpleBlock (0xA3, its size, track number, 2-byte time)."""
    p = cluster.timestamp[1]
    assert data[p] == 0xA3
    size_len = 9 - data[p + 1].bit_length()
    body = p + 1 + size_len
    track_len = 9 - data[body].bit_length()
    return body + track_len + 2


def test_the_loader_decodes_from_the_keyframe_before_each_clip(gop_set):
    """The loader's count of decoded frames is what a seeking decoder decodes (from the keyframe at or before each
    clip), not every frame from the video's start, which DALI's CPU decoder would decode given the whole video."""
    cfg = load_config(LoaderConfig, None, [f"root={gop_set}", "batch_size=2", f"num_frames={NUM_FRAMES}",
                                           f"frame_stride={STRIDE}", "crop_size=32", "threads=1", "seed=3"])
    loader = VideoLoader(cfg, grid=(3, 2, 2))
    try:
        it = iter(loader)
        seeking = whole = 0
        for _ in range(6):
            b = next(it)
            for rec, row in zip(b.records, b.rows):
                n = loader.index.nframes(row)
                seeking += decoded_frames(rec.start, n, NUM_FRAMES, STRIDE, KEYFRAMES)
                whole += frame_indices(rec.start, n, NUM_FRAMES, STRIDE)[-1] + 1
            assert loader.decoded_frames(b) == sum(
                decoded_frames(r.start, loader.index.nframes(row), NUM_FRAMES, STRIDE, KEYFRAMES)
                for r, row in zip(b.records, b.rows))
        assert seeking < whole  # the records include clips past the first GOP
    finally:
        loader.close()
