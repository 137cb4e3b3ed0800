"""What counts as a bad video, and the decode-back check every written sample passes.

`REASONS` is the bounded set of rejection reasons (they label metrics and fill the rejects table); `Rejected`
carries one with a detail. `validate_video` decodes a transcoded sample back: PyAV counts every frame, and DALI,
the decoder of training, decodes a few frames that must match FFmpeg's (so DALI's frame numbering is ours).
"""

from __future__ import annotations

import io
from typing import Dict, List, Optional, Tuple

import av
import numpy as np

# The rejection reasons, a bounded set (they label metrics and fill the rejects table).
REASONS = (
    "empty_file", "file_too_large", "unreadable", "not_a_video", "no_video_stream", "bad_dimensions",
    "too_short", "too_long", "decode_error", "truncated", "validation_failed", "decoder_crash",
    "internal_error", "not_an_image",
)
# DALI and FFmpeg upsample chroma and convert YUV to RGB differently: on sharp textures single pixels differ
# by 10+ levels. Compared on 4x4-averaged frames they agree within ~2.5 levels, while the neighbouring frame
# of a moving clip (a wrong frame index) is 6+ away and corrupt data far more.
MAX_VALIDATION_MAD = 4.0
VALIDATION_POOL = 4


def _pooled(x: np.ndarray, k: int = VALIDATION_POOL) -> np.ndarray:
    h, w = x.shape[0] // k * k, x.shape[1] // k * k
    if h == 0 or w == 0:
        return x.astype(np.float32)
    return x[:h, :w].reshape(h // k, k, w // k, k, -1).mean((1, 3), dtype=np.float32)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def validate_video(video: bytes, codec: str, how: str = "auto",
                   expected: Optional[int] = None) -> Tuple[int, Tuple[int, int]]:
    """Decode a written sample back; returns (frame count, (height, width)) or raises Rejected.

    PyAV decodes every frame (the count); DALI, the decoder of training, decodes the first, middle and
    last frame, which must match PyAV's frames at the same indices (so DALI's frame numbering is ours).
    Only those frames are kept (memory stays bounded for long videos): their indices come from `expected`,
    the frame count the caller wrote, or else from a first counting pass.
    """
    if expected is None:
        expected = _decode_frames(video, ())[0]
    idx = sorted({0, expected // 2, max(expected - 1, 0)})
    n, frames = _decode_frames(video, idx)
    if n == 0:
        raise Rejected("validation_failed", "the transcoded video has no frames")
    h, w = frames[0].shape[:2]
    if n != expected:
        return n, (h, w)  # the caller rejects the count mismatch
    device = dali_device_for(codec)
    if how == "dali" or (how == "auto" and device is not None):
        try:
            got = dali_decode_frames(video, idx, device or "cpu")  # forced where DALI cannot: it fails, a reject
        except Exception as e:  # DALI raises plain RuntimeErrors for undecodable input
            raise Rejected("validation_failed", f"DALI cannot decode the transcoded video: "
                                                f"{str(e).strip().splitlines()[-1][:300]}") from None
        for i, g in zip(idx, got):
            if g.shape != frames[i].shape:
                raise Rejected("validation_failed", f"frame {i}: DALI gives {g.shape}, FFmpeg {frames[i].shape}")
            mad = float(np.abs(_pooled(g) - _pooled(frames[i])).mean())
            if mad > MAX_VALIDATION_MAD:
                raise Rejected("validation_failed", f"frame {i}: DALI and FFmpeg differ by {mad:.1f} levels on average "
                                                    f"(4x4-averaged; limit {MAX_VALIDATION_MAD})")
    return n, (h, w)


def _decode_frames(video: bytes, keep) -> Tuple[int, Dict[int, np.ndarray]]:
    """Decode every frame with PyAV: the frame count, and the frames at indices `keep` (plus 0) as RGB."""
    keep = set(keep) | {0}
    frames: Dict[int, np.ndarray] = {}
    n = 0
    try:
        with av.open(io.BytesIO(video)) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            for n, f in enumerate(c.decode(s), 1):
                if n - 1 in keep:
                    frames[n - 1] = f.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise Rejected("validation_failed", f"the transcoded video does not decode: {e}") from None
    return n, frames


def cuda_available() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount  # type: ignore
        return GetCUDADeviceCount() > 0
    except Exception:
        return False


# the codecs DALI's CPU video decoder reads (2.4: VP8, VP9, MJPEG); the GPU's (NVDEC) reads H.264, HEVC, ... too
CPU_DECODABLE = ("vp8", "vp9", "mjpeg")


def dali_device_for(codec: str) -> Optional[str]:
    """Where DALI decodes the decode-back check of `codec`: its CPU decoder when it reads the codec (the same
    demuxer and frame numbering as on a GPU, and no CUDA context in each shard worker), else the GPU's when there
    is one; None when DALI cannot decode it on this machine."""
    if codec in CPU_DECODABLE:
        return "cpu"
    return "mixed" if cuda_available() else None


def dali_can_decode(codec: str) -> bool:
    return dali_device_for(codec) is not None


_DALI_PIPES: Dict[str, object] = {}  # one per device, per process


def dali_decode_frames(video: bytes, frames: List[int], device: str = "cpu") -> List[np.ndarray]:
    """Decode the given frame indices of an in-memory video with DALI on `device` (cpu or mixed)."""
    pipe = _DALI_PIPES.get(device)
    if pipe is None:
        pipe = _DALI_PIPES[device] = _build_dali_pipe(device)
    try:
        pipe.feed_input("video", [np.frombuffer(video, np.uint8)])
        pipe.feed_input("frames", [np.asarray(frames, np.int32)])
        (out,) = pipe.run()
    except Exception:
        del _DALI_PIPES[device]  # a failed DALI pipeline is not reusable: build a fresh one next time
        raise
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    arr = np.array(out[0])
    return [arr[i] for i in range(arr.shape[0])]


def _build_dali_pipe(device: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def pipe():
        video = fn.external_source(name="video", batch=True, dtype=types.UINT8)
        frames = fn.external_source(name="frames", batch=True, dtype=types.INT32)
        return fn.decoders.video(video, device=device, frames=frames)

    p = pipe()
    p.build()
    return p
