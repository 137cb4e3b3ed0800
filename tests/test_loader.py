"""The streaming loader: DALI output equals the PyAV reference, determinism, exact resume, rank splits, errors."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from common.config import load_config
from pipeline.config import LoaderConfig
from pipeline.loader import LoaderError, VideoLoader
from shards.manifest import ManifestError, read_manifest, verify
from pipeline.reference import ReferenceLoader
from pipeline.sampling import Plan, clip_span

GRID = (4, 3, 3)  # 8 frames / tubelet 2, 48 px / patch 16
# one grey level of a [0, 255] frame, in normalised units (ImageNet std ~0.226)
LEVEL = 1 / (0.226 * 255)


def rewrite_samples(root, table: pa.Table) -> None:
    """Replace a set's samples.arrow with `table` (the same rows per shard, one record batch each), as a tampering
    or a broken writer would leave it."""
    counts = read_manifest(str(root)).shards
    with pa.ipc.new_file(str(root / "samples.arrow"), table.schema) as w:
        at = 0
        for sh in counts:
            w.write_batch(table.slice(at, sh["samples"]).combine_chunks().to_batches()[0])
            at += sh["samples"]


def cfg_for(root: str, *extra: str) -> LoaderConfig:
    return load_config(LoaderConfig, None, [f"root={root}", "batch_size=3", "num_frames=8", "frame_stride=3",
                                            "crop_size=48", "dtype=fp32", "threads=2", *extra])


def take(loader, n):
    """n batches, moved to the CPU: on a GPU host the DALI loader's come from the GPU, the reference's never do."""
    it = iter(loader)
    return [on_cpu(next(it)) for _ in range(n)]


def on_cpu(b):
    return replace(b, clips=b.clips.cpu(), masks=[(c.cpu(), t.cpu()) for c, t in b.masks], labels=b.labels.cpu(),
                   padded=b.padded.cpu())


def same_batches(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and x.records == y.records and x.epoch == y.epoch and x.step == y.step
        assert torch.equal(x.clips, y.clips)
        for (c1, t1), (c2, t2) in zip(x.masks, y.masks, strict=True):
            assert torch.equal(c1, c2) and torch.equal(t1, t2)


def test_dali_matches_reference_loader(small_shards):
    cfg = cfg_for(small_shards)
    dali = take(VideoLoader(cfg, grid=GRID), 6)  # 12 train videos, batch 3: crosses an epoch boundary
    ref = list(ReferenceLoader(cfg, grid=GRID).batches(6))
    for d, r in zip(dali, ref, strict=True):
        assert d.keys == r.keys and d.records == r.records
        assert d.clips.shape == (len(d.keys), 3, 8, 48, 48) and d.clips.dtype == torch.float32
        for (c1, t1), (c2, t2) in zip(d.masks, r.masks, strict=True):
            assert torch.equal(c1, c2) and torch.equal(t1, t2)
        diff = (d.clips - r.clips).abs()
        # decoders and resize filters round differently; a wrong frame, crop or flip is far above this
        assert diff.mean() < 1.5 * LEVEL, d.keys
        for i, rec in enumerate(d.records):
            flipped = r.clips[i].flip(-1)
            if rec.flip or not torch.allclose(flipped, r.clips[i], atol=8 * LEVEL):
                assert (d.clips[i] - flipped).abs().mean() > 3 * (d.clips[i] - r.clips[i]).abs().mean()
    index = VideoLoader(cfg, grid=GRID).index
    assert (index.column("nframes") < clip_span(8, 3)).any(), "the set must include clips shorter than the window (padding)"


def test_crop_window_is_exact(small_shards):
    """Shifting the crop window by a few pixels must show: the comparison sees crops, not just statistics."""
    cfg = cfg_for(small_shards, "flip=false")
    d = take(VideoLoader(cfg, grid=GRID), 2)
    ref = ReferenceLoader(cfg, grid=GRID)
    plans = [next(ref.plan) for _ in range(2)]
    from pipeline.reference import make_clip
    from pipeline.store import ShardStore

    store = ShardStore(small_shards)
    for batch, bp in zip(d, plans):
        for i, (row, rec) in enumerate(zip(bp.rows, bp.records)):
            y0, x0, h, w = rec.crop
            if w < ref.index[row][2] - 4:  # room to shift
                shifted = replace(rec, crop=(y0, x0 + 4 if x0 + w + 4 <= ref.index[row][2] else x0 - 4, h, w))
                video = ref.index.read_video(store, row)
                good = make_clip(video, rec, ref.index.nframes(row), 8, 3, 48)[0]
                bad = make_clip(video, shifted, ref.index.nframes(row), 8, 3, 48)[0]
                assert (batch.clips[i] - good).abs().mean() < 0.5 * (batch.clips[i] - bad).abs().mean()


def test_same_seed_same_batches_and_epochs_reshuffle(small_shards):
    cfg = cfg_for(small_shards)
    a = take(VideoLoader(cfg, grid=GRID), 8)  # 4 steps per epoch: 2 epochs
    b = take(VideoLoader(cfg, grid=GRID), 8)
    same_batches(a, b)
    epoch0 = [k for x in a[:4] for k in x.keys]
    epoch1 = [k for x in a[4:] for k in x.keys]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert [x.epoch for x in a] == [0] * 4 + [1] * 4
    other = take(VideoLoader(replace(cfg, seed=1), grid=GRID), 4)
    assert [k for x in other for k in x.keys] != epoch0


def test_order_does_not_depend_on_threads(small_shards):
    same_batches(take(VideoLoader(cfg_for(small_shards, "threads=1"), grid=GRID), 3),
                 take(VideoLoader(cfg_for(small_shards, "threads=2", "prefetch=3"), grid=GRID), 3))


def test_resume_is_exact(small_shards):
    cfg = cfg_for(small_shards)
    straight = take(VideoLoader(cfg, grid=GRID), 7)
    first = VideoLoader(cfg, grid=GRID)
    take(first, 3)  # DALI has prefetched beyond these: the state must count only what was received
    state = first.state_dict()
    first.close()
    assert state["position"] == 9 and state["epoch"] == 0
    resumed = VideoLoader(cfg, grid=GRID)
    resumed.load_state_dict(state)
    same_batches(straight[3:], take(resumed, 4))


def test_state_for_another_dataset_is_refused(small_shards):
    loader = VideoLoader(cfg_for(small_shards), grid=GRID)
    with pytest.raises(ValueError, match="wrong dataset or config"):
        loader.load_state_dict({"epoch": 0, "position": 3, "seed": 0, "num_items": 999})


def test_two_ranks_disjoint_complete_equal_steps(small_shards):
    cfg = cfg_for(small_shards, "batch_size=2")  # 12 videos, 2 ranks x 2: 3 steps per epoch
    ranks = [VideoLoader(cfg, grid=GRID, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 3
    seen = [[k for b in take(l, 3) for k in b.keys] for l in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ranks[0].index.keys)


@pytest.mark.parametrize("n,batch,world", [(12, 2, 2), (13, 3, 2), (10, 4, 3), (5, 2, 4), (2, 4, 3)])
def test_plan_every_sample_once_per_epoch(n, batch, world):
    plans = [Plan([(20, 64, 64)] * n, batch_size=batch, rank=r, world_size=world, seed=3) for r in range(world)]
    steps = plans[0].steps_per_epoch
    rows = []
    for p in plans:
        batches = [next(p) for _ in range(steps)]
        assert all(b.epoch == 0 for b in batches) and len(batches) == steps
        rows += [r for b in batches for r, pad in zip(b.rows, b.padded) if not pad]
    assert sorted(rows) == list(range(n))


def test_resume_with_another_world_size_serves_the_rest_once():
    geom = [(20, 64, 64)] * 23
    two = [Plan(geom, batch_size=3, rank=r, world_size=2, seed=5) for r in range(2)]
    served = [r for p in two for _ in range(2) for r in next(p).rows]  # 2 steps of 2 ranks x 3
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    three = [Plan(geom, batch_size=3, rank=r, world_size=3, seed=5) for r in range(3)]
    for p in three:
        p.load_state_dict(state)
    rest_steps = -(-(23 - state["position"]) // 9)
    for p in three:
        for _ in range(rest_steps):
            b = next(p)
            served += [r for r, pad in zip(b.rows, b.padded) if not pad]
    assert sorted(served) == list(range(23))


def window_plans(n, shards, world, per_node, **kw):
    shard_of_row = np.arange(n) * shards // n  # contiguous shards of about n / shards samples
    return shard_of_row, [Plan([(20, 64, 64)] * n, batch_size=4, rank=r, world_size=world, seed=7, shuffle="window",
                               shard_counts=np.bincount(shard_of_row), ranks_per_node=per_node, **kw)
                          for r in range(world)]


@pytest.mark.parametrize("world,per_node,partitions", [(1, 1, 0), (4, 2, 0), (8, 4, 8), (6, 2, 8), (3, 1, 3)])
def test_window_order_serves_every_sample_once_and_nodes_read_their_share(world, per_node, partitions):
    """The window order (data.shuffle=window): every sample once per epoch whatever the ranks; when the node
    count divides the canonical partitions, each node reads only its partitions' shards (about 1/nodes of them:
    a partition may share a shard with its neighbours at its two ends)."""
    n, shards = 997, 40
    shard_of_row, plans = window_plans(n, shards, world, per_node, partitions=partitions, window=2)
    nodes = world // per_node
    rows, read = [], {}
    for rank, p in enumerate(plans):
        for _ in range(p.steps_per_epoch):
            b = next(p)
            assert b.epoch == 0
            rows += [r for r, pad in zip(b.rows, b.padded) if not pad]
            read.setdefault(rank // per_node, set()).update(shard_of_row[b.rows].tolist())
    assert sorted(rows) == list(range(n))
    parts = plans[0].partitions
    if parts % nodes == 0:
        # a partition spans shards / parts shards, plus at most one cut shard at its ends; the epoch's short last
        # step is split over the ranks as in the global order (at most a batch per rank from elsewhere)
        bound = parts // nodes * (-(-shards // parts) + 1) + per_node * 4
        for node_shards in read.values():
            assert len(node_shards) <= bound and (nodes == 1 or len(node_shards) < shards), (len(node_shards), bound)
    else:  # not a multiple: every node reads everything (still exact)
        assert all(len(s) == shards for s in read.values())


def test_window_order_is_a_shuffle_within_windows_and_resumes_elastically():
    n = 500
    shard_of_row, (one,) = window_plans(n, 50, 1, 1, partitions=2, window=3)
    first = [next(one) for _ in range(20)]
    rows = [r for b in first for r in b.rows]
    assert rows != sorted(rows)  # shuffled
    # consecutive positions of a partition stay within a window of ~3 shards, so the first 80 samples come
    # from at most 2 partitions x a few windows, not from all 50 shards
    assert len(set(shard_of_row[rows].tolist())) <= 2 * 3 * 3
    state = one.state_dict()
    assert state["shuffle"] == "window" and state["partitions"] == 2
    # resume with 4 ranks on 2 nodes, canonical partitions taken from the state (0 = auto): the rest once
    _, four = window_plans(n, 50, 4, 2, window=3)
    for p in four:
        p.load_state_dict(state)
        assert p.partitions == 2
    rest = []
    while four[0].epoch == 0 and four[0].position < n:
        for p in four:
            b = next(p)
            rest += [r for r, pad in zip(b.rows, b.padded) if not pad]
    assert sorted(rows + rest) == list(range(n))
    # the order is part of the state: another window or the global order is refused, naming the keys
    _, (other,) = window_plans(n, 50, 1, 1, partitions=2, window=4)
    with pytest.raises(ValueError, match="data.shuffle_window"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="data.shuffle"):
        Plan([(20, 64, 64)] * n, batch_size=4, seed=7).load_state_dict(state)


def test_upcoming_rows_are_the_rows_the_plan_reads_next():
    _, (p,) = window_plans(100, 10, 1, 1, partitions=2, window=2)
    for _ in range(3):
        next(p)
    ahead = p.upcoming_rows(30)  # crosses into the next epoch (25 steps per epoch)
    assert ahead == [r for _ in range(30) for r in next(p).rows]


def test_eval_views_one_pass(small_shards):
    cfg = cfg_for(small_shards, "split=val", "eval_clips=2", "eval_crops=3", "batch_size=4")
    loader = VideoLoader(cfg, grid=None, train=False)
    batches = list(loader)
    views = [(k, r.view) for b in batches for k, r in zip(b.keys, b.records)]
    assert len(views) == len(set(views)) == 4 * 6
    assert all(not r.flip for b in batches for r in b.records) and all(b.masks == [] for b in batches)
    again = list(VideoLoader(cfg, grid=None, train=False))
    same_batches(batches, again)
    crops = {r.crop for b in batches for r in b.records}
    assert len(crops) > 3  # left/centre/right windows differ


def test_masks_in_batches(small_shards):
    b = take(VideoLoader(cfg_for(small_shards), grid=GRID), 1)[0]
    assert len(b.masks) == 2
    for ctx, tgt in b.masks:
        assert ctx.shape[0] == tgt.shape[0] == len(b.keys) and ctx.dtype == torch.int64
        for c, t in zip(ctx.tolist(), tgt.tolist()):
            assert not set(c) & set(t) and max(c + t) < np.prod(GRID)


def test_half_precision_batches_are_the_fp32_clips_rounded_once(small_shards):
    """bf16 and fp16 batches equal the fp32 loader's clips rounded to that dtype, and a batch the consumer holds
    stays as it was while the next ones are made (the CPU's bf16 path reuses one staging buffer). On a GPU, DALI
    yields float16 for bf16: rounded twice there."""
    full = take(VideoLoader(cfg_for(small_shards), grid=GRID), 3)
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        loader = VideoLoader(cfg_for(small_shards, f"dtype={name}"), grid=GRID)
        via = torch.float16 if loader.device.type == "cuda" else dt
        for h, f in zip(take(loader, 3), full, strict=True):
            assert h.clips.dtype == dt and h.keys == f.keys
            assert torch.equal(h.clips, f.clips.to(via).to(dt)), name


@pytest.fixture
def shard_copy(small_shards, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(small_shards, dst)
    return dst


@pytest.fixture(scope="module")
def stepped_shards(tmp_path_factory) -> str:
    """A set stored at the clips' sampling rate: transcode.frame_step=4, a keyframe every 4 stored frames. Two
    videos whose grey level counts source frames (10 + 6 i), four with a moving box, 24-30 fps, 40-48 frames."""
    from shards.build import run
    from shards.config import ShardsConfig
    from videos import write_video

    root = tmp_path_factory.mktemp("stepped")
    for i in range(2):
        write_video(root / "in" / f"count{i}.webm", "libvpx-vp9", 64 + 16 * i, 48, 30, 40, pattern="counter")
    for i, (w, h) in enumerate(((96, 64), (80, 64), (64, 80), (112, 64))):
        write_video(root / "in" / f"box{i}.mp4", "libx264", w, h, 24, 48)
    cfg = load_config(ShardsConfig, None, [f"inputs.train={root / 'in'}", f"output={root / 'shards'}", "workers=2",
                                           "progress=false", "transcode.frame_step=4",
                                           "transcode.keyframe_interval=4", "transcode.crf=8"])
    run(cfg)
    return str(root / "shards")


def test_a_set_stored_at_the_sampling_rate_gives_the_same_clips(stepped_shards):
    """frame_stride=4 on a frame_step=4 set decodes consecutive stored frames: the same source frames (start,
    start+4, ...) as stride 4 over every frame would; DALI still equals the reference. Starts on keyframes
    (align_starts) decode no frame before the clip's first."""
    from pipeline.sampling import decoded_frames

    cfg = cfg_for(stepped_shards, "num_frames=4", "frame_stride=4", "batch_size=2", "flip=false")
    loader = VideoLoader(cfg, grid=(2, 3, 3))
    assert (loader.index.frame_step, loader.index.keyframe_interval, loader.stride) == (4, 4, 1)
    dali = take(loader, 6)
    ref = ReferenceLoader(cfg, grid=(2, 3, 3))
    for d, r in zip(dali, ref.batches(6), strict=True):
        assert d.records == r.records
        # 2 grey levels: an upscaling crop of the H.264 boxes (42 -> 48 px wide) resamples 1.7 levels apart
        assert (d.clips - r.clips).abs().mean() < 2 * LEVEL, d.keys
        for i, key in enumerate(d.keys):
            if key.startswith("count"):  # grey level of clip frame j = source frame 4 (start + j)
                level = d.clips[i, 0].mean((1, 2)) * 0.229 * 255 + 0.485 * 255
                start = d.records[i].start
                assert torch.allclose(level, torch.tensor([10.0 + 24 * (start + j) for j in range(4)]), atol=3)
    aligned = replace(cfg, align_starts=True)
    ref = ReferenceLoader(aligned, grid=(2, 3, 3))
    batches = list(ref.batches(6))
    records = [(rec, ref.index.nframes(row)) for b in batches for rec, row in zip(b.records, b.rows)]
    assert all(rec.start % 4 == 0 for rec, _ in records)
    expected = sum(decoded_frames(rec.start, n, 4, 1, 4) for rec, n in records)
    assert ref.decoded_frames == expected == 4 * len(records)  # measured by the seeking reference: no waste


def test_host_work_runs_off_the_training_thread_and_threads_share_the_cores(small_shards, monkeypatch):
    """Reading shards, CRC checks, records and masks run on the feeder thread; DALI gets the cores divided by the
    ranks on this host (torchrun's LOCAL_WORLD_SIZE)."""
    import threading

    where = set()
    real = VideoLoader._prepare
    monkeypatch.setattr(VideoLoader, "_prepare",
                        lambda self, *a: where.add(threading.current_thread().name) or real(self, *a))
    loader = VideoLoader(cfg_for(small_shards), grid=GRID)
    take(loader, 3)
    loader.close()
    assert where == {"tubelet-feeder"}
    cores = len(os.sched_getaffinity(0))
    assert VideoLoader(cfg_for(small_shards, "threads=0"), grid=GRID, local_world_size=2).threads == max(1, cores // 2)


def test_a_stride_the_stored_step_does_not_divide_is_refused(stepped_shards):
    with pytest.raises(ManifestError, match="data.frame_stride=3 is not a multiple of the frame_step 4"):
        VideoLoader(cfg_for(stepped_shards), grid=GRID)


def test_truncated_or_missing_shard_refused_where_it_is_read(shard_copy):
    """Start-up reads no shard (a rank pays for shards, not for checking them all); the first read of a shard that
    does not have its manifest size stops the loader naming the shard and tubelet-verify, before any of its
    samples is decoded; a missing one too. tubelet-verify finds both."""
    m = read_manifest(str(shard_copy))
    name = m.shards[0]["name"]
    with open(shard_copy / name, "r+b") as f:
        f.truncate(os.path.getsize(shard_copy / name) - 1024)
    loader = VideoLoader(cfg_for(str(shard_copy), "split=" + m.shards[0]["split"]), grid=GRID)
    with pytest.raises(ManifestError, match=f"shard {name} .* the manifest says .*tubelet-verify"):
        take(loader, loader.steps_per_epoch)
    gone = m.shards[-1]
    os.unlink(shard_copy / gone["name"])
    loader = VideoLoader(cfg_for(str(shard_copy), "split=" + gone["split"]), grid=GRID)
    with pytest.raises(ManifestError, match=f"shard {gone['name']} .* is missing"):
        take(loader, loader.steps_per_epoch)
    with pytest.raises(ManifestError, match=f"(?s){name}.*{gone['name']}|{gone['name']}.*{name}"):
        verify(str(shard_copy))


def test_hashes_checked_when_first_read_with_verify_hashes(shard_copy):
    """data.verify_hashes=true: a shard whose bytes changed (same size) fails on its first read, naming it."""
    m = read_manifest(str(shard_copy))
    sh = m.shards[0]
    with open(shard_copy / sh["name"], "r+b") as f:  # inside the tar's end padding: sizes and members intact
        f.seek(sh["bytes"] - 10)
        f.write(b"x")
    cfg = cfg_for(str(shard_copy), "split=" + sh["split"])
    take(VideoLoader(cfg, grid=GRID), 1)  # sizes agree: read
    loader = VideoLoader(cfg_for(str(shard_copy), "split=" + sh["split"], "verify_hashes=true"), grid=GRID)
    with pytest.raises(ManifestError, match=f"shard {sh['name']} .*sha256"):
        take(loader, loader.steps_per_epoch)


def test_missing_manifest_refused(shard_copy):
    os.unlink(shard_copy / "manifest.parquet")
    with pytest.raises(ManifestError, match="not a finished shard set"):
        VideoLoader(cfg_for(str(shard_copy)), grid=GRID)


def test_shard_not_matching_offsets_gives_clear_error(shard_copy):
    m = read_manifest(str(shard_copy))
    row = m.samples.slice(0, 1).to_pylist()[0]
    with open(shard_copy / row["shard"], "r+b") as f:  # clobber the member's tar header
        f.seek(row["video_offset"] - 512)
        f.write(b"X" * 100)
    loader = VideoLoader(cfg_for(str(shard_copy), "split=" + row["split"]), grid=GRID)
    with pytest.raises(ManifestError, match=row["shard"]):
        take(loader, 4)


def test_garbage_inside_a_video_is_never_trained_on(shard_copy, caplog):
    """40 KB of random bytes inside one sample (sizes and tar headers intact): its CRC-32 fails on read; by default
    it is skipped (a repeat of another sample of the batch stands in, flagged padded), counted and logged with its
    key and shard; with on_corrupt=fail the run stops naming them."""
    m = read_manifest(str(shard_copy))
    row = max(m.split("train").to_pylist(), key=lambda r: r["video_size"])
    with open(shard_copy / row["shard"], "r+b") as f:
        f.seek(row["video_offset"] + row["video_size"] // 4)
        f.write(os.urandom(min(40_000, row["video_size"] // 2)))
    stats = []
    loader = VideoLoader(cfg_for(str(shard_copy)), grid=GRID, on_batch=stats.append)
    batches = take(loader, loader.steps_per_epoch)  # one epoch: every sample once
    delivered = [k for b in batches for k, p in zip(b.keys, b.padded.tolist()) if not p]
    assert row["key"] not in [k for b in batches for k in b.keys]
    assert len(delivered) == len(m.split("train")) - 1 and sum(s.corrupt for s in stats) == 1
    assert any(row["key"] in r.message and row["shard"] in r.message for r in caplog.records
               if r.levelname == "WARNING")
    failing = VideoLoader(cfg_for(str(shard_copy), "on_corrupt=fail"), grid=GRID)
    with pytest.raises(ManifestError, match=f"sample {row['key']} in shard {row['shard']} .* is corrupt"):
        take(failing, failing.steps_per_epoch)


def test_undecodable_video_bytes_name_the_samples(shard_copy):
    """Bytes that pass their checksum but do not decode (a set written with a broken encoder): the decode error
    names the samples and shards and says how to check the set."""
    import pyarrow.parquet as pq
    import zlib

    table = read_manifest(str(shard_copy)).samples
    crcs = []
    for row in table.to_pylist():  # garble every video's payload, and record the garbage's checksums
        with open(shard_copy / row["shard"], "r+b") as f:
            f.seek(row["video_offset"])
            garbage = os.urandom(row["video_size"])
            f.write(garbage)
        crcs.append(zlib.crc32(garbage))
    i = table.schema.get_field_index("video_crc32")
    rewrite_samples(shard_copy, table.set_column(i, "video_crc32", pa.array(crcs, pa.int64())))
    loader = VideoLoader(cfg_for(str(shard_copy)), grid=GRID)
    with pytest.raises(LoaderError, match="while decoding one of the samples"):
        take(loader, 2)


def test_shard_names_that_leave_the_set_are_refused(shard_copy, tmp_path):
    """Names in a manifest are data: `../` or absolute shard names must never make a reader or a cache touch a file
    outside the set."""
    import pyarrow.parquet as pq

    table = pq.read_table(shard_copy / "manifest.parquet")
    for bad in ("../outside.tar", "/etc/passwd", "sub/x.tar"):
        names = [bad] + table.column("name").to_pylist()[1:]
        pq.write_table(table.set_column(0, "name", pa.array(names)), shard_copy / "manifest.parquet")
        with pytest.raises(ManifestError, match="plain file names inside the set"):
            VideoLoader(cfg_for(str(shard_copy)), grid=GRID)
    pq.write_table(table, shard_copy / "manifest.parquet")
    rows = read_manifest(str(shard_copy)).samples
    i = rows.schema.get_field_index("shard")
    rewrite_samples(shard_copy, rows.set_column(i, "shard", pa.array(["../" + n for n in
                                                                      rows.column("shard").to_pylist()])))
    with pytest.raises(ManifestError, match="plain file names inside the set"):
        read_manifest(str(shard_copy))
    from pipeline.store import ShardStore

    with pytest.raises(ManifestError, match="plain file names"):  # the store checks names too, for the cache
        ShardStore("memory://set", cache_dir=str(tmp_path)).read("../../x.tar", 512, 10, "k.webm", 1024)


def test_remote_shards_through_fsspec_with_local_cache(small_shards, tmp_path):
    """Shards behind an fsspec URL are verified remotely, downloaded once into the cache, and read from there."""
    import fsspec

    mem = fsspec.filesystem("memory")
    root = f"memory://tubelet-test-{os.getpid()}/shards"
    mem.put(small_shards, root.removeprefix("memory://"), recursive=True)
    cache = tmp_path / "cache"
    remote = take(VideoLoader(cfg_for(root, f"cache_dir={cache}"), grid=GRID), 3)  # window order: remote default
    same_batches(take(VideoLoader(cfg_for(small_shards, "shuffle=window"), grid=GRID), 3), remote)
    cached = sorted(p.name for p in cache.rglob("*.tar"))
    assert cached and set(cached) <= {s["name"] for s in read_manifest(small_shards).shards}


def test_cut_clip_follows_the_sampling_record():
    """The definition of a clip (pipeline/clips.py), shared by the reference loader and the research harness:
    the record's frames (the last one repeats past the end), crop window, flip and normalisation."""
    from pipeline.clips import IMAGENET_MEAN, IMAGENET_STD, cut_clip
    from pipeline.sampling import ClipRecord, frame_indices

    video = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 8, 12, 3).clone()
    video[:, :, 6:] += 100  # right half brighter
    rec = ClipRecord(start=2, crop=(0, 0, 8, 12), flip=True)
    assert frame_indices(rec.start, 10, 4, 3) == [2, 5, 8, 9]  # the last frame repeats past the end
    clip = cut_clip(video[frame_indices(rec.start, 10, 4, 3)], rec, size=4)
    assert clip.shape == (3, 4, 4, 4)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255
    grey = (clip * std + mean)[0]  # [T, S, S] grey levels
    assert torch.allclose(grey[:, 0, 0], torch.tensor([102.0, 105, 108, 109]), atol=1e-3)  # flipped: right half
    assert torch.allclose(grey[:, 0, -1], torch.tensor([2.0, 5, 8, 9]), atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# the hand-off to the training thread, and the rank's GPU


def test_the_batch_hand_off_never_makes_the_host_wait(small_shards):
    """next(loader) on the training thread reads no value on the host and builds no tensor from Python data (on
    a GPU: a blocking copy from pageable memory): everything the batch carries was made by the feeder thread."""
    from host_sync import NoHostSync

    loader = VideoLoader(cfg_for(small_shards), grid=GRID)
    it = iter(loader)
    next(it)  # builds the DALI graph
    try:
        with NoHostSync():
            batches = [next(it) for _ in range(3)]
    finally:
        loader.close()
    assert all(b.padded.dtype == torch.bool and b.labels.dtype == torch.int64 for b in batches)


def test_each_rank_decodes_and_copies_on_its_own_gpu(small_shards, monkeypatch):
    """local_rank 3 of 4: DALI runs on GPU 3 (device_id, not the process's current device) and the copy stream is
    made there; nothing is read from the environment."""
    import pipeline.loader as loader_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    made = []
    monkeypatch.setattr(loader_mod, "CudaHandoff", lambda device: made.append(device) or "handoff")
    monkeypatch.setenv("LOCAL_RANK", "0")  # ignored: the argument says
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    loader = VideoLoader(cfg_for(small_shards, "device=cuda", "threads=0"), grid=GRID, rank=7, world_size=8,
                         local_rank=3, local_world_size=4)
    assert loader.device == torch.device("cuda", 3) and made == [torch.device("cuda", 3)]
    assert loader.pipeline_kwargs()["device_id"] == 3
    assert loader.threads == max(1, len(os.sched_getaffinity(0)) // 4)
    with pytest.raises(Exception, match="LOCAL_RANK=4 but this node has 4 GPUs"):
        VideoLoader(cfg_for(small_shards, "device=cuda"), grid=GRID, local_rank=4)


class _Recorder:
    """Stands for torch.cuda and the tensors of a CudaHandoff: logs each call with the stream it ran on."""

    def __init__(self):
        self.log, self.current = [], "train"
        recorder = self

        class Stream:
            def __init__(self, device):
                self.name, self.device = "copy", device

            def wait_stream(self, other):
                recorder.log.append(("wait_stream", self.name, other.name))

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.before, recorder.current = recorder.current, self.stream.name

            def __exit__(self, *exc):
                recorder.current = self.before

        class Event:
            def record(self, stream):
                recorder.log.append(("event.record", stream.name))

            def synchronize(self):
                recorder.log.append(("event.synchronize", recorder.current))

        class Tensor:
            def __init__(self, dtype):
                self.dtype = dtype

            def to(self, dtype):
                recorder.log.append(("convert", recorder.current))
                return Tensor(dtype)

            def record_stream(self, stream):
                recorder.log.append(("record_stream", stream.name))

        self.Stream, self.Event, self.stream, self.Tensor = Stream, Event, StreamContext, Tensor
        self.train_stream = Stream(None)
        self.train_stream.name = "train"

    def current_stream(self, device):
        self.log.append(("current_stream", device))
        return self.train_stream

    def empty(self, shape, dtype, device):
        self.log.append(("alloc", self.current, device))
        return self.Tensor(dtype)

    def feed(self, dali_tensor, buf, cuda_stream):
        self.log.append(("copy", self.current, cuda_stream.name))


def test_the_copy_out_of_dali_is_ordered_with_the_training_stream():
    """The buffer is allocated while the copy stream is current (never a block the training stream may still be
    using), the copy and the dtype conversion run there, the training stream waits for it on the device and the
    clips are recorded as used by it; the host waits for the copy (not for training) only before DALI's next run,
    which may reuse the output's memory."""
    from pipeline.handoff import CudaHandoff

    rec = _Recorder()
    out = type("Out", (), {"as_tensor": lambda self: type("T", (), {"shape": lambda self: (2, 3)})()})()
    handoff = CudaHandoff(torch.device("cuda", 2), cuda=rec, empty=rec.empty)
    dev = torch.device("cuda", 2)
    handoff.before_run()  # nothing in flight: no wait
    clips = handoff.to_torch(out, torch.bfloat16, fp32=False, feed=rec.feed)
    assert clips.dtype == torch.bfloat16
    assert rec.log == [("current_stream", dev), ("alloc", "copy", dev), ("copy", "copy", "copy"),
                       ("convert", "copy"), ("event.record", "copy"), ("wait_stream", "train", "copy"),
                       ("record_stream", "train")]
    rec.log.clear()
    handoff.before_run()
    assert rec.log == [("event.synchronize", "train")]  # the copy's event, once
    rec.log.clear()
    handoff.before_run()
    assert rec.log == []
    with pytest.raises(ValueError, match="explicit GPU"):
        CudaHandoff(torch.device("cuda"), cuda=rec, empty=rec.empty)


def test_global_order_is_a_permutation_evaluated_per_position():
    """The global order is a bijection of [0, n) per epoch, a pure function of (seed, epoch, position), another
    per epoch and seed, with no array of n."""
    from pipeline.sampling import PermutedOrder

    for n in (1, 2, 3, 7, 1000, 4097):
        order = PermutedOrder(n, seed=3, epoch=1)
        rows = order.map(np.arange(n))
        assert sorted(rows.tolist()) == list(range(n))
        assert [order[g] for g in range(0, n, max(1, n // 7))] == rows[::max(1, n // 7)].tolist()
    a, b = PermutedOrder(1000, 3, 1).map(np.arange(1000)), PermutedOrder(1000, 3, 2).map(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != PermutedOrder(1000, 4, 1).map(np.arange(1000))).mean() > 0.9
    assert np.corrcoef(np.arange(1000), a)[0, 1] ** 2 < 0.01  # no trace of the input order


class _Rows:
    """A set of `n` samples that answers a row's geometry on demand, as a SplitIndex does."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, row):
        assert 0 <= row < self.n
        return 40, 64, 64


@pytest.mark.parametrize("shuffle", ["global", "window"])
def test_a_plan_of_a_billion_samples_holds_no_array_of_them(shuffle):
    """A plan is built from per-shard counts: a billion samples in a million shards plan their first steps (and
    what to prefetch) in a few MB, on any rank."""
    import tracemalloc

    n, shards = 10**9, 10**6
    tracemalloc.start()
    plan = Plan(_Rows(n), batch_size=8, rank=5, world_size=16, ranks_per_node=8, seed=1, shuffle=shuffle,
                shard_counts=np.full(shards, n // shards))
    steps = [next(plan) for _ in range(3)]
    upcoming = plan.upcoming_rows(4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # the shard arrays (8 MB each), never 8 GB of rows
    rows = [r for b in steps for r in b.rows] + upcoming
    assert len(rows) == 7 * 8 and len(set(rows)) == len(rows) and all(0 <= r < n for r in rows)
