"""The streaming stage: a DALI pipeline turns shards into V-JEPA batches (clips + masks), resumable to the sample.

The project samples (pipeline/sampling.py), DALI decodes and augments: per step, the sampler names the
rows and the sampling record of each clip (start frame, crop window, flip); a feeder thread reads the encoded
videos from the shards by manifest offset, checks them, cuts each to the GOPs its clip needs (`pipeline.gops`:
DALI's CPU decoder cannot seek in memory), draws the masks (pinned memory on a GPU), and queues them for one
DALI graph, so none of that runs on the training thread:

    external_source -> decoders.video (start, 16 frames, the stride in stored frames, edge padding)
                    -> resize (the crop window -> crop_size^2, linear, antialiased)
                    -> crop_mirror_normalize (flip, ImageNet mean/std, FHWC -> CFHW, fp16 or fp32)

and for an image set (`make shards kind=image`) decoders.image_slice (only the crop window: nvJPEG's ROI
decode on a GPU) -> resize -> crop_mirror_normalize to [B, 3, 1, H, W], a clip of one frame.

with device='mixed' (NVDEC) on a GPU and 'cpu' without one: the same graph. A set stored at the clips'
sampling rate (transcode.frame_step) is decoded at stride frame_stride / frame_step. DALI prepares `prefetch`
batches ahead; the loader's state is what the consumer has received, so resuming ignores what was in flight.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import torch

from common.device import resolve_device
from pipeline import gops
from pipeline.clips import DTYPES, IMAGENET_MEAN, IMAGENET_STD, Batch, LoaderStats, map_masks, masks_to
from pipeline.config import LoaderConfig
from pipeline.handoff import CudaHandoff
from pipeline.sampling import BatchPlan, ClipRecord, Plan, frame_indices, keyframe_before
from pipeline.split_index import SplitIndex, open_split, plan_for
from pipeline.store import store_for
from shards.manifest import CorruptSample

log = logging.getLogger(__name__)


class LoaderError(RuntimeError):
    """Decoding a batch failed; the message names the samples and shards involved."""


@dataclass
class _Fed:
    """One step's inputs, prepared by the feeder thread; `plan` and what follows are what the batch needs."""

    plan: BatchPlan
    videos: List[np.ndarray]
    starts: List[np.ndarray]
    roi0: List[np.ndarray]
    roi1: List[np.ndarray]
    flips: List[np.ndarray]
    masks: List[Tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor
    padded: torch.Tensor  # [B] bool
    bytes_read: int
    feed_seconds: float
    corrupt: int
    decoded_frames: int  # what the decoder decodes for the batch (`VideoLoader._cut`)
    fed_at: float = 0.0


class _Feeder:
    """A thread that runs the sampling plan ahead and prepares each step's inputs (`VideoLoader._prepare`) into a
    queue of `depth` steps: reading shards, CRC checks, records and masks never run on the training thread. An
    error is queued in place of the step it broke, so it surfaces exactly when that step is due; the plan's end
    (an evaluation pass) as StopIteration."""

    def __init__(self, loader: "VideoLoader", plan: Plan, state: dict, depth: int):
        self.plan = plan
        self.plan.load_state_dict(state)
        self._loader, self._queue, self._stop = loader, queue.Queue(maxsize=depth), threading.Event()
        self._thread = threading.Thread(target=self._run, name="tubelet-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._loader.device.type == "cuda":  # a new thread starts on GPU 0: pinning there would make a context
            torch.cuda.set_device(self._loader.device)
        while not self._stop.is_set():
            try:
                item = self._loader._prepare(self.plan, next(self.plan))
            except BaseException as e:  # StopIteration included: handed to the consumer in order
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def take(self):
        return self._queue.get()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _dali_reason(e: BaseException) -> str:
    """The line of a DALI error that says what went wrong (not its traceback, C++ context or the follow-up
    'pipeline object is no longer valid')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not (ln.startswith(("C++ context", "File ", "Critical error", "Error in",
                                                        "which was used", "encountered"))
                                         or "no longer valid" in ln)]
    return (useful or lines or [type(e).__name__])[-1]


class VideoLoader:
    """Iterate V-JEPA batches for one rank.

    train=True: endless, reshuffled every epoch, random clip records. train=False: one pass over every video's
    `eval_clips x eval_crops` views, in order (the frozen probe's evaluation). `grid` = (T', H', W') tubelet
    grid for the masks (None: no masks). The rank's place in the job comes from its distributed environment:
    `local_rank` picks its GPU (cuda:local_rank, for DALI and the copies), `local_world_size` (the ranks on this
    host) shares the host's cores among their DALI threads and groups ranks into nodes for the window order.
    """

    def __init__(self, cfg: LoaderConfig, *, grid: Optional[Tuple[int, int, int]] = None, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0, local_world_size: int = 1, train: bool = True,
                 on_batch: Optional[Callable[[LoaderStats], None]] = None):
        self.cfg, self.grid, self.train = cfg, grid, train
        self.index: SplitIndex = open_split(cfg.root, cfg.split, cfg.verify_hashes, cfg.retry_policy(), cfg.cache_dir)
        self.store = store_for(cfg)
        self.index.use_cache(self.store.cache)
        self.device = resolve_device(cfg.device, local_rank, key="data.device")
        self._handoff = CudaHandoff(self.device) if self.device.type == "cuda" else None
        self.dtype = DTYPES[cfg.dtype]
        self.on_batch = on_batch
        self._plan_args = dict(rank=rank, world_size=world_size, train=train, ranks_per_node=local_world_size)
        self.stride = self.index.stride_for(cfg.frame_stride)  # in stored frames
        self.images = self.index.kind == "image"  # an image set: clips of one frame, decoded as JPEG
        if self.images and cfg.num_frames != 1:
            raise LoaderError(f"{cfg.root} is an image set: clips have one frame, set data.num_frames=1 (the "
                              "model: num_frames=1 tubelet_size=1)")
        # the loader's one plan (O(shards)): the feeder runs it; between runs it only validates states
        self._plan = plan_for(self.index, cfg, **self._plan_args)
        self._state = self._plan.state_dict()
        # DALI CPU threads: the cores this process may use, shared with the other ranks on this host; never pinned
        # (set_affinity=False), so ranks do not pile onto the same cores
        self.threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
        self._pipe = None
        self._feeder: Optional[_Feeder] = None
        # DALI has no bfloat16. On a GPU it yields float16 for bf16 and fp16 (half the bytes of float32); on the
        # CPU float32 for bf16, whose conversion to bf16 costs a third of float16's there (one rounding, too)
        self._dali_fp32 = cfg.dtype == "fp32" or (cfg.dtype == "bf16" and self.device.type != "cuda")
        self._staging: Optional[torch.Tensor] = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return self._plan.steps_per_epoch

    def state_dict(self) -> dict:
        """(epoch, position) of what the consumer has received: batches in flight are not counted."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._close_pipe()  # the feeder stops using the plan
        self._plan.load_state_dict(state)  # validates
        self._state = dict(state)

    # -- DALI --------------------------------------------------------------------------------------

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.device.type == "cuda"
        self._inflight: Deque[_Fed] = deque()
        self._feed_error: Optional[Exception] = None
        self._feeder = _Feeder(self, self._plan, self._state, depth=cfg.prefetch + 1)
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]

        @pipeline_def(**self.pipeline_kwargs())
        def graph():
            if self.images:  # no start frame
                data, roi0, roi1, flip = fn.external_source(source=self._feed, num_outputs=4, batch=True,
                                                            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
                # the crop window decoded alone (nvJPEG's ROI decode on a GPU: the crop fused into the decode),
                # then resized like a clip's frames; anchor and shape in (x, y)
                frames = fn.decoders.image_slice(data, roi0, roi1, device="mixed" if gpu else "cpu",
                                                 output_type=types.RGB, axis_names="WH",  # (x, y), (w, h)
                                                 normalized_anchor=False, normalized_shape=False)
                size = [cfg.crop_size, cfg.crop_size]
                frames = fn.resize(frames, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
                layout = "CHW"
            else:
                data, start, roi0, roi1, flip = fn.external_source(
                    source=self._feed, num_outputs=5, batch=True,
                    dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32])
                frames = fn.decoders.video(data, device="mixed" if gpu else "cpu", start_frame=start,
                                           sequence_length=cfg.num_frames, stride=self.stride, pad_mode="edge")
                frames = fn.resize(frames, size=[cfg.crop_size, cfg.crop_size], roi_start=roi0, roi_end=roi1,
                                   roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
                layout = "CFHW"
            return fn.crop_mirror_normalize(frames, mirror=flip, mean=mean, std=std, output_layout=layout,
                                            dtype=types.FLOAT if self._dali_fp32 else types.FLOAT16)

        self._pipe = graph()
        self._pipe.build()

    def pipeline_kwargs(self) -> dict:
        """The DALI pipeline's settings: on this loader's GPU (device_id = its index), not the current device."""
        return dict(batch_size=self.cfg.batch_size, num_threads=self.threads,
                    device_id=self.device.index if self.device.type == "cuda" else None,
                    prefetch_queue_depth=self.cfg.prefetch, exec_dynamic=True, set_affinity=False)

    def _feed(self):
        """DALI pulls the next batch's inputs (ahead of the consumer, up to `prefetch` batches): prepared by the
        feeder thread, so the training thread only takes them from its queue."""
        item = self._feeder.take()
        if isinstance(item, BaseException):
            if not isinstance(item, StopIteration):  # DALI would wrap it; keep the original (it names the shard)
                self._feed_error = item
            raise item
        item.fed_at = time.perf_counter()
        self._inflight.append(item)
        if self.images:
            return item.videos, item.roi0, item.roi1, item.flips
        return item.videos, item.starts, item.roi0, item.roi1, item.flips

    def _prepare(self, plan: Plan, bp: BatchPlan) -> _Fed:
        """Everything DALI and the batch need of one step, on the feeder thread: the encoded videos read from the
        shards and checked, the sampling records as arrays, the masks (in pinned memory for a GPU)."""
        t0 = time.perf_counter()
        if self.store.cache is not None:  # remote: download what the next steps read, ahead and in parallel
            self.store.prefetch(bp.rows, plan.upcoming_rows(self.cfg.prefetch_steps), self.index.shard_of,
                                self.index.shard_bytes)
        before = self.store.bytes_read
        bp, videos, corrupt = self._read_batch(bp)
        recs = bp.records
        starts, decoded = [], 0
        for i, (rec, row) in enumerate(zip(recs, bp.rows)):
            videos[i], start, work = self._cut(videos[i], rec, row)
            starts.append(np.array(start, np.int32))
            decoded += work
        masks = map_masks(plan.masks(bp, self.grid, self.cfg.mask_specs(self.grid)), self._host)
        if self.images:  # the slice's anchor (x0, y0) and shape (w, h)
            roi0 = [np.array((r.crop[1], r.crop[0]), np.float32) for r in recs]
            roi1 = [np.array((r.crop[3], r.crop[2]), np.float32) for r in recs]
        else:  # the resize's window corners (y0, x0), (y1, x1)
            roi0 = [np.array(r.crop[:2], np.float32) for r in recs]
            roi1 = [np.array((r.crop[0] + r.crop[2], r.crop[1] + r.crop[3]), np.float32) for r in recs]
        return _Fed(bp, [np.frombuffer(v, np.uint8) for v in videos], starts, roi0, roi1,
                    [np.array(int(r.flip), np.int32) for r in recs], masks,
                    self._host(self.index.labels_of(bp.rows)), self._host(np.array(bp.padded, dtype=bool)),
                    self.store.bytes_read - before,
                    time.perf_counter() - t0, corrupt, decoded)

    def _cut(self, video: bytes, rec: ClipRecord, row: int) -> Tuple[bytes, int, int]:
        """What DALI gets for one clip: (the encoded bytes, the clip's start frame in them, the frames the decoder
        decodes for it). A WebM video is cut to the clip's GOPs (`pipeline.gops`): DALI's CPU decoder cannot seek
        in memory and would decode every frame before the clip's first. A video that cannot be cut exactly goes
        whole: the CPU decoder then decodes from frame 0, the GPU decoder from the keyframe before the clip."""
        if self.images:
            return video, 0, 1
        nframes = self.index.nframes(row)
        last = frame_indices(rec.start, nframes, self.cfg.num_frames, self.stride)[-1]
        lay = gops.layout(video, nframes)
        if lay is not None:
            video, first = gops.clip_slice(video, lay, rec.start, last)
        elif self.device.type == "cuda":
            first = keyframe_before(rec.start, self.index.keyframe_interval)
        else:
            first = 0
        return video, rec.start - first, last - first + 1

    def decoded_frames(self, batch: Batch) -> int:
        """Frames the decoder decodes for `batch`: from the first frame DALI was given of each clip's video (the
        keyframe at or before the clip's first frame, or frame 0 for a whole video on the CPU) through its last;
        1 per image."""
        return batch.decoded_frames

    def _host(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory() if self.device.type == "cuda" else t

    def _read_batch(self, bp: BatchPlan) -> Tuple[BatchPlan, List[bytes], int]:
        """The batch's encoded videos, each checked against its CRC-32. A corrupt one (data.on_corrupt=skip) is
        logged with its key and shard and replaced by a repeat of the batch's first intact sample, flagged padded:
        the batch keeps its size, the stream stays a function of (seed, epoch, position), and nothing corrupt is
        decoded. Returns the (possibly amended) plan, the videos and the number replaced."""
        videos: List[Optional[bytes]] = []
        for r in bp.rows:
            try:
                videos.append(self.index.read_video(self.store, r))
            except CorruptSample as e:
                if self.cfg.on_corrupt == "fail":
                    raise
                log.warning("skipping a corrupt sample: %s", e)
                videos.append(None)
        bad = [i for i, v in enumerate(videos) if v is None]
        if not bad:
            return bp, videos, 0
        good = next((i for i, v in enumerate(videos) if v is not None), None)
        if good is None:
            raise LoaderError(f"every sample of a batch is corrupt ({[self.index.key(r) for r in bp.rows]} in "
                              f"{self.cfg.root}); rebuild the set with `make shards`")
        rows, records, padded = list(bp.rows), list(bp.records), list(bp.padded)
        for i in bad:
            rows[i], records[i], padded[i], videos[i] = rows[good], records[good], True, videos[good]
        return replace(bp, rows=rows, records=records, padded=padded), videos, len(bad)

    def _close_pipe(self) -> None:
        if self._handoff is not None:
            self._handoff.before_run()  # the last copy out of the pipeline's memory has run before it goes
        if self._pipe is not None:
            del self._pipe
            self._pipe = None
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder = None

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> "VideoLoader":
        if self._pipe is None:
            self._build()
        return self

    def __next__(self) -> Batch:
        if self._pipe is None:
            self._build()
        t0 = time.perf_counter()
        if self._handoff is not None:
            self._handoff.before_run()  # DALI may reuse the last output's memory from this run on
        try:
            (out,) = self._pipe.run()
        except StopIteration:
            self._close_pipe()
            raise
        except Exception as e:
            feed_error = self._feed_error
            rows = [r for item in self._inflight for r in item.plan.rows]  # the batches DALI was working on
            self._close_pipe()
            if feed_error is not None:
                raise feed_error from None
            shards = sorted({self.index.shard_of[r] for r in rows})
            what = (f" while decoding one of the samples {[self.index.key(r) for r in rows][:12]} from shards "
                    f"{shards} of {self.cfg.root}")
            raise LoaderError(f"the DALI pipeline failed{what}: {_dali_reason(e)[:300]}. "
                              "Check the set with `python -m shards.verify hashes=true "
                              f"root={self.cfg.root}` and rebuild bad shards with `make shards`.") from None
        fed = self._inflight.popleft()
        bp = fed.plan
        clips = self._to_torch(out)
        t1 = time.perf_counter()
        self._state = {**self._state, "epoch": bp.epoch, "position": bp.next_position}
        dev = clips.device
        # every tensor was made by the feeder (pinned on a GPU): asynchronous copies, no host wait here
        batch = Batch(
            clips=clips,
            masks=masks_to(fed.masks, dev),
            keys=[self.index.key(r) for r in bp.rows],
            labels=fed.labels.to(dev, non_blocking=True),
            records=bp.records, padded=fed.padded.to(dev, non_blocking=True), epoch=bp.epoch, step=bp.step,
            rows=bp.rows, decoded_frames=fed.decoded_frames,
        )
        if self.on_batch is not None:
            self.on_batch(LoaderStats(t1 - t0, fed.feed_seconds, t1 - fed.fed_at, fed.bytes_read, len(bp.rows),
                                      sum(bp.padded), len(self._inflight), bp.epoch, bp.next_position, fed.corrupt,
                                      self.store.cache_stats))
        return batch

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._handoff is not None:
            clips = self._handoff.to_torch(out, self.dtype, self._dali_fp32, feed_ndarray)
        elif self.dtype == torch.bfloat16:  # DALI's float32 through a staging buffer kept from batch to batch
            t = out.as_tensor()
            if self._staging is None or tuple(self._staging.shape) != tuple(t.shape()):
                self._staging = torch.empty(t.shape(), dtype=torch.float32)
            feed_ndarray(t, self._staging)
            clips = torch.empty(self._staging.shape, dtype=torch.bfloat16).copy_(self._staging)
        else:  # copied into torch's memory (DALI reuses its buffer from the next run on)
            t = out.as_tensor()
            clips = torch.empty(t.shape(), dtype=self.dtype)
            feed_ndarray(t, clips)
        return clips.unsqueeze(2) if self.images else clips  # images: [B, 3, 1, H, W], a clip of one frame

    def close(self) -> None:
        self._close_pipe()
        self.store.close()
