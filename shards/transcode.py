"""One input video -> one validated, transcoded training sample, or a rejection with a reason.

Runs in worker processes of `make shards`. Every step that can meet bad input turns it into a `Reject`
(never an exception that could end the run): unreadable storage, empty or absurd files, things that are
not video, audio-only files, too short or too long, corrupt or truncated streams. Variable frame rate and
rotation metadata are handled: output is constant-rate and upright. The written sample is decoded back
by the decoder family training uses (DALI) and compared with the encoder's input before it is accepted.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import av
import numpy as np

from common.files import url_to_fs
from common.retry import RetryPolicy, StorageError
from shards.config import FilterConfig, TranscodeConfig
from shards.images import ImageConfig, process_image
from shards.validate import Rejected, validate_video

CONTAINER = {"vp9": ("webm", "libvpx-vp9"), "h264": ("mp4", "libx264")}
X264_PRESETS = ("veryslow", "slower", "slow", "medium", "fast", "faster", "veryfast", "superfast", "ultrafast")
@dataclass
class Sample:
    key: str
    video: bytes
    ext: str  # tar member extension of the video: webm or mp4
    meta: Dict  # JSON metadata (source, duration, fps, nframes, size, codec, label ...)
    seconds: float = 0.0  # CPU time spent on this video (the worker process's, all its threads)


@dataclass
class Reject:
    key: str
    source: str
    reason: str
    detail: str
    seconds: float = 0.0


@dataclass
class Unavailable:
    """The input could not be read because of transient storage errors, every try: not a property of the video,
    so never recorded as a reject; the run stops and a rerun resumes."""

    key: str
    source: str
    detail: str
    seconds: float = 0.0


@dataclass
class Job:
    key: str
    url: str
    label: Optional[str]
    label_index: Optional[int]
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    kind: str = "video"  # video | image (ShardsConfig.kind)
    image: ImageConfig = field(default_factory=ImageConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # for reading the input (ShardsConfig.retries)
    data: Optional[bytes] = None  # the input's bytes, read by the parent: inputs a worker cannot open (memory://)


def process_local(url: str) -> bool:
    """True for inputs that exist only in the process that lists them (fsspec's memory://): the parent reads
    them for the worker processes."""
    return "memory" in url_to_fs(url)[0].protocol


def process(job: Job) -> Sample | Reject | Unavailable:
    """Read, check, transcode and validate one video. Never raises for bad input."""
    t0 = time.process_time()  # CPU, not wall: the summary reports source-seconds per worker CPU-second
    try:
        sample = _process(job)
        sample.seconds = time.process_time() - t0
        return sample
    except Rejected as r:
        return Reject(job.key, job.url, r.reason, r.detail, time.process_time() - t0)
    except StorageError as e:
        return Unavailable(job.key, job.url, str(e), time.process_time() - t0)
    except Exception as e:  # a bug or an unforeseen input must cost one video, not the run
        return Reject(job.key, job.url, "internal_error", f"{type(e).__name__}: {e}", time.process_time() - t0)


def read_input(url: str, flt: FilterConfig, retry: RetryPolicy) -> bytes:
    """The bytes of input `url`, transient storage errors retried (StorageError once they persist)."""
    def read() -> bytes:
        fs, path = url_to_fs(url)
        size = fs.size(path)
        if size is not None and size > flt.max_file_bytes:
            raise Rejected("file_too_large", f"{size} bytes > filter.max_file_bytes={flt.max_file_bytes}")
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        data = retry.call(read, f"reading {url}")
    except (Rejected, StorageError):
        raise
    except (OSError, ValueError) as e:  # missing, access denied, not a file: the input's fault
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from None
    return data


def _output_size(w: int, h: int, short_side: int, align: int = 2) -> Tuple[int, int]:
    """Scale so the short side is `short_side` (never upscaling), both sides multiples of `align` (4:2:0 needs 2;
    16 = whole macroblocks, what hardware decoders allocate): the short side rounded down, the long side to the
    nearest multiple (aspect within align/2 pixels), never above the source's."""
    short, long_ = min(w, h), max(w, h)
    target = min(short_side, short) if short_side else short
    out_short = max(align, target // align * align)
    scaled_long = long_ * out_short / short
    out_long = max(align, min(int(round(scaled_long / align)) * align, max(align, long_ // align * align)))
    return (out_long, out_short) if w >= h else (out_short, out_long)


# How common containers begin: (offset, bytes). mp4/mov (ISO boxes), Matroska/WebM (EBML), AVI/WAV (RIFF), FLV,
# Ogg, GIF, MPEG program stream, ASF/WMV. (MPEG-TS: a sync byte every 188 bytes.)
_CONTAINER_MAGIC = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (0, b"\x1aE\xdf\xa3"),
                    (0, b"RIFF"), (0, b"FLV"), (0, b"OggS"), (0, b"GIF8"), (0, b"\x00\x00\x01\xba"),
                    (0, b"\x30\x26\xb2\x75"))


def _looks_like_a_container(data: bytes) -> bool:
    return any(data[o:o + len(m)] == m for o, m in _CONTAINER_MAGIC) or (len(data) > 188 and data[0] == data[188] == 0x47)


def _open_video(data: bytes, url: str, flt: FilterConfig):
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        why = str(e).replace(": '<none>'", "").strip()  # PyAV names an in-memory file '<none>'
        if _looks_like_a_container(data):
            raise Rejected("truncated", f"{url} starts like a video container but cannot be opened ({why}); "
                                        "it is probably cut short (an interrupted download or copy)") from None
        raise Rejected("not_a_video", f"{url}: no known container ({why})") from None
    streams = [
        s for s in container.streams.video
        if not (s.disposition & av.stream.Disposition.attached_pic)  # cover art of an audio file
    ]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise Rejected("no_video_stream", f"streams: {', '.join(kinds)}")
    stream = streams[0]
    cc = stream.codec_context
    w, h = cc.width, cc.height
    if not (flt.min_side <= min(w, h) and max(w, h) <= flt.max_side) or max(w, h) > flt.max_aspect * min(w, h):
        container.close()
        raise Rejected("bad_dimensions", f"{w}x{h} outside filter.min_side={flt.min_side}, "
                                         f"max_side={flt.max_side}, max_aspect={flt.max_aspect}")
    return container, stream


def _declared_duration(container, stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def _rotate(frame: av.VideoFrame, rotation: int) -> av.VideoFrame:
    """Apply display-matrix rotation (degrees counter-clockwise) so the output is upright."""
    k = int(round(rotation / 90.0)) % 4
    if k == 0:
        return frame
    img = np.rot90(frame.to_ndarray(format="rgb24"), k=k)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")


def _encoder(codec: str, cfg: TranscodeConfig, width: int, height: int, rate: Fraction):
    ext, lib = CONTAINER[codec]
    buf = io.BytesIO()
    out = av.open(buf, mode="w", format=ext, options={"fflags": "+bitexact"})
    st = out.add_stream(lib, rate=rate)
    st.width, st.height, st.pix_fmt = width, height, "yuv420p"
    st.time_base = 1 / rate
    st.codec_context.gop_size = cfg.keyframe_interval
    st.codec_context.thread_count = 1  # parallelism is across videos; one thread keeps output deterministic
    st.codec_context.flags |= av.codec.context.Flags.bitexact
    if codec == "vp9":
        st.options = {"crf": str(cfg.crf), "b": "0", "cpu-used": str(cfg.speed), "deadline": "good",
                      "keyint_min": str(cfg.keyframe_interval), "row-mt": "0"}
    else:
        st.options = {"crf": str(cfg.crf), "preset": X264_PRESETS[cfg.speed],
                      "x264-params": f"keyint={cfg.keyframe_interval}:min-keyint={cfg.keyframe_interval}:scenecut=0"}
    return buf, out, st


def _process(job: Job) -> Sample:
    data = job.data if job.data is not None else read_input(job.url, job.filter, job.retry)
    if not data:
        raise Rejected("empty_file", "the file has 0 bytes")
    if job.kind == "image":
        return _image_sample(job, data)
    container, stream = _open_video(data, job.url, job.filter)
    try:
        return _transcode(job, data, container, stream)
    finally:
        container.close()


def _transcode(job: Job, data: bytes, container, stream) -> Sample:
    cfg, flt = job.transcode, job.filter
    declared = _declared_duration(container, stream)
    if declared is not None and declared > flt.max_duration:
        raise Rejected("too_long", f"{declared:.1f} s > filter.max_duration={flt.max_duration}")
    if declared is not None and 0 < declared < flt.min_duration:
        raise Rejected("too_short", f"{declared:.3f} s < filter.min_duration={flt.min_duration}")
    src_rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not src_rate or not (0.5 <= float(src_rate) <= 1000):
        src_rate = None  # derive from timestamps below
    out_rate = Fraction(cfg.fps).limit_denominator(1001) if cfg.fps else None  # before frame_step
    step = cfg.frame_step
    stream.codec_context.thread_count = 1

    enc = None
    resize = av.video.reformatter.VideoReformatter()  # one per video: keeps its scaler set up between frames
    times: List[float] = []
    rotation = 0
    n_slots = 0  # constant-rate slots at out_rate filled so far
    n_out = 0  # frames stored: every `step`-th slot
    prev = None  # the latest decoded (and resized) source frame
    limit = cfg.max_frames or math.inf

    def emit_until(slot: float) -> None:
        """Repeat the latest source frame into every constant-rate slot before `slot`; store every step-th."""
        nonlocal n_slots, n_out
        while n_slots < slot and n_out < limit:
            if n_slots % step == 0:
                prev.pts = n_out
                prev.time_base = step / out_rate
                for pkt in enc[2].encode(prev):
                    enc[1].mux(pkt)
                n_out += 1
            n_slots += 1

    try:
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else len(times) / float(src_rate or 25)
            if times and t <= times[-1]:
                continue  # duplicate or out-of-order timestamp: keep the first
            if not times:
                rotation = int(frame.rotation or 0)
                w, h = frame.width, frame.height
                if abs(rotation) % 180 == 90:
                    w, h = h, w
                ow, oh = _output_size(w, h, cfg.short_side, cfg.align)
                if out_rate is None:
                    # a stream without any usable rate gets FFmpeg's default
                    out_rate = Fraction(src_rate).limit_denominator(1001) if src_rate else Fraction(25)
                enc = _encoder(cfg.codec, cfg, ow, oh, out_rate / step)
            times.append(t)
            # Each source frame owns the output slots from round(its time * rate) to the next frame's:
            # nearest-frame resampling, as FFmpeg's fps filter does (drops or repeats frames as needed).
            if prev is not None:
                emit_until(round((t - times[0]) * out_rate))
            if n_out >= limit:
                break
            prev = resize.reformat(_rotate(frame, rotation), width=ow, height=oh, format="yuv420p",
                                   interpolation="BICUBIC")
    except av.error.FFmpegError as e:
        raise Rejected("decode_error", f"after {len(times)} frames: {e}") from None
    if not times:
        raise Rejected("decode_error", "no frame could be decoded")

    intervals = np.diff(times)
    src_fps = float(src_rate) if src_rate else (1.0 / float(np.median(intervals)) if len(intervals) else 25.0)
    end = times[-1] - times[0] + (1.0 / src_fps)
    emit_until(max(round(end * out_rate), n_slots + 1))
    for pkt in enc[2].encode():
        enc[1].mux(pkt)
    enc[1].close()
    video = enc[0].getvalue()

    duration = min(n_slots, n_out * step) / float(out_rate)
    if duration < flt.min_duration:
        raise Rejected("too_short", f"{duration:.3f} s < filter.min_duration={flt.min_duration}")
    if declared and not cfg.max_frames and end < 0.9 * declared - 0.5:
        raise Rejected("truncated", f"decoded {end:.2f} s of a declared {declared:.2f} s")
    vfr = bool(len(intervals) > 2 and (intervals.max() - intervals.min()) > 0.1 * float(np.median(intervals)))

    nframes, (vh, vw) = validate_video(video, cfg.codec, job.filter.decode_check, expected=n_out)
    if nframes != n_out:
        raise Rejected("validation_failed", f"wrote {n_out} frames but {nframes} decode back")
    ext = CONTAINER[cfg.codec][0]
    meta = {
        "key": job.key,
        "source": job.url,
        "source_bytes": len(data),
        "source_codec": stream.codec_context.name,
        "source_width": stream.codec_context.width,
        "source_height": stream.codec_context.height,
        "source_fps": round(src_fps, 4),
        "source_duration": round(end, 4),
        "rotation": rotation,
        "vfr": vfr,
        "duration": round(duration, 4),
        "fps": round(float(out_rate / step), 4),  # of the stored frames
        "frame_step": step,
        "nframes": n_out,
        "width": vw,
        "height": vh,
        "codec": cfg.codec,
        "keyframe_interval": cfg.keyframe_interval,
        "label": job.label,
        "label_index": job.label_index,
    }
    return Sample(job.key, video, ext, meta)


def _image_sample(job: Job, data: bytes) -> Sample:
    """An image is a clip of one frame: the same sample fields, nframes 1, no duration."""
    jpeg, info = process_image(data, job.image, job.filter)
    meta = {"key": job.key, "source": job.url, "source_fps": 0.0, "source_duration": 0.0, "vfr": False,
            "duration": 0.0, "fps": 0.0, "frame_step": 1, "nframes": 1, "keyframe_interval": 1,
            "label": job.label, "label_index": job.label_index, **info}
    return Sample(job.key, jpeg, "jpg", meta)


def meta_json(meta: Dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def nframes_bytes(n: int) -> bytes:
    return np.array([n], dtype="<i4").tobytes()

