"""Small real test videos written with PyAV (shared by the shard and loader tests).

`write_video` encodes a synthetic clip (a bright box moving over a gradient) with a real encoder into
the container named by the file extension. Helpers below make the bad inputs `make shards` must reject.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import numpy as np

CONTAINERS = {".mp4": "mp4", ".m4a": "mp4", ".webm": "webm", ".mkv": "matroska", ".avi": "avi",
              ".mov": "mov"}
PIX_FMT = {"mjpeg": "yuvj420p"}
# single-threaded, fast settings; bitexact muxing so the same call gives the same bytes
OPTIONS = {
    "libx264": {"preset": "ultrafast", "crf": "23"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "35", "b": "0", "row-mt": "0",
                   "lag-in-frames": "0"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "1000000"},
    "mpeg4": {"b": "400000"},
    "mjpeg": {},
}


def frame_image(i: int, w: int, h: int, pattern: str = "moving box", marker: Optional[str] = None) -> np.ndarray:
    """RGB uint8 (h, w, 3) frame `i` of a synthetic clip."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    if pattern == "flat":
        img[:] = 64
    elif pattern == "counter":  # a flat grey whose level tells the frame: 10 + 6 i (i < 41)
        img[:] = 10 + 6 * i
    elif pattern == "noise":  # incompressible: for big files and shards
        img[:] = np.random.default_rng(i).integers(0, 256, (h, w, 3), np.uint8)
    else:
        img[..., 0] = (x * 255 // max(w - 1, 1)).astype(np.uint8) // 2
        img[..., 1] = (y * 255 // max(h - 1, 1)).astype(np.uint8) // 2
        img[..., 2] = ((x + y + 3 * i) % 64).astype(np.uint8)
        bs = max(4, min(w, h) // 4)
        bx = (3 * i) % max(w - bs, 1)
        by = (2 * i) % max(h - bs, 1)
        img[by:by + bs, bx:bx + bs] = (220, 40, 40)
    if marker:  # a saturated white square in one corner: 'tl', 'tr', 'bl' or 'br'
        m = max(4, min(w, h) // 4)
        ys = slice(0, m) if marker[0] == "t" else slice(h - m, h)
        xs = slice(0, m) if marker[1] == "l" else slice(w - m, w)
        img[ys, xs] = 255
    return img


def write_video(path, codec: str = "libx264", w: int = 64, h: int = 48, fps: float = 12, nframes: int = 12,
                pattern: str = "moving box", rotation: Optional[int] = None,
                pts: Optional[Sequence[int]] = None, time_base: Optional[Fraction] = None,
                marker: Optional[str] = None, container: Optional[str] = None) -> Path:
    """Encode a synthetic clip to `path` (container chosen by extension unless `container` is given).

    rotation: display rotation in degrees (counter-clockwise, as FFmpeg's display matrix) stored as
    stream side data. pts: explicit presentation timestamps in `time_base` units (default 1/1000) for a
    variable-frame-rate stream; `nframes` is then len(pts).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = container or CONTAINERS[path.suffix.lower()]
    rate = Fraction(fps).limit_denominator(1001)
    if pts is not None:
        nframes = len(pts)
        time_base = time_base or Fraction(1, 1000)
    with av.open(str(path), mode="w", format=fmt, options={"fflags": "+bitexact"}) as out:
        st = out.add_stream(codec, rate=rate)
        st.width, st.height = w, h
        st.pix_fmt = PIX_FMT.get(codec, "yuv420p")
        st.codec_context.thread_count = 1
        st.codec_context.flags |= av.codec.context.Flags.bitexact
        st.options = dict(OPTIONS.get(codec, {}))
        if pts is not None:
            st.time_base = time_base
            st.codec_context.time_base = time_base
        if rotation is not None:
            st.set_display_rotation(rotation)
        for i in range(nframes):
            frame = av.VideoFrame.from_ndarray(frame_image(i, w, h, pattern, marker), format="rgb24")
            frame = frame.reformat(format=st.pix_fmt)
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = time_base
            else:
                frame.pts = i
                frame.time_base = 1 / rate
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def write_audio_only(path, seconds: float = 1.0, codec: Optional[str] = None) -> Path:
    """An audio-only file (aac in .m4a/.mp4, opus in .webm/.mkv): has streams, but no video."""
    path = Path(path)
    fmt = CONTAINERS[path.suffix.lower()]
    codec = codec or ("aac" if fmt in ("mp4", "mov") else "libopus")
    sr = 48000
    with av.open(str(path), mode="w", format=fmt) as out:
        st = out.add_stream(codec, rate=sr)
        st.layout = "mono"
        n = 960
        t = 0
        while t < seconds * sr:
            samples = (0.2 * np.sin(2 * np.pi * 440 * (np.arange(t, t + n) / sr))).astype(np.float32)
            fmt_name = st.codec_context.format.name if st.codec_context.format else "fltp"
            fr = av.AudioFrame.from_ndarray(samples[None, :], format="fltp" if fmt_name == "fltp" else "flt",
                                            layout="mono")
            fr.sample_rate, fr.pts = sr, t
            for pkt in st.encode(fr):
                out.mux(pkt)
            t += n
        for pkt in st.encode():
            out.mux(pkt)
    return path


def write_empty(path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_not_video(path, nbytes: int = 4096) -> Path:
    """Random-looking bytes under a video extension."""
    path = Path(path)
    path.write_bytes(b"this is not a video\n" + np.random.default_rng(0).integers(0, 256, nbytes, np.uint8).tobytes())
    return path


def truncate_copy(src, dst, fraction: float = 0.5) -> Path:
    """A copy of `src` cut after `fraction` of its bytes (a half-downloaded file)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def vfr_pts(nframes: int, fps: float = 12, seed: int = 0) -> list:
    """Irregular millisecond timestamps averaging `fps` (intervals vary between 0.5x and 1.5x)."""
    rng = np.random.default_rng(seed)
    step = 1000.0 / fps
    t, out = 0.0, []
    for _ in range(nframes):
        out.append(int(round(t)))
        t += step * rng.uniform(0.5, 1.5)
    return out


def decode_rgb(path_or_bytes) -> list:
    """All frames of a video (path or bytes) as RGB arrays, via PyAV."""
    import io

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    with av.open(src) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


if __name__ == "__main__":  # quick manual check
    import sys
    import tempfile

    d = tempfile.mkdtemp()
    for name, codec in [("a.mp4", "libx264"), ("b.webm", "libvpx-vp9"), ("c.avi", "mpeg4"), ("d.mov", "mjpeg")]:
        p = write_video(os.path.join(d, name), codec)
        print(p, p.stat().st_size, len(decode_rgb(p)), file=sys.stderr)
