"""Built-in sample dataset: short, labelled, synthetic motion videos.

``generate(out_dir)`` writes a small deterministic dataset that has exactly the
shape of what a user brings: ordinary video files in assorted containers,
codecs, frame rates, resolutions and durations, plus one ``path,label`` CSV per
split::

    OUT/videos/<split>/<class>/<class>_<index>.<ext>
    OUT/train.csv, OUT/val.csv      header ``path,label``; path relative to OUT
    OUT/classes.txt                 one class per line, in label order
    OUT/SAMPLE.json                 written last (atomically): completion marker

Every clip shows a textured object over a textured background that drifts in a
random direction at a random speed.  The class is *how the object moves*
(see ``CLASSES``); every class is invariant to horizontal flips.  All
appearance parameters (background, object shape/texture/colour/size/start
position and orientation) are drawn from the same distributions, in the same
order, for every class, and the motion starts at ``t = 0``: for one random
generator state the first frame is *identical* whatever the class.  Size,
position and angle are drawn from the stationary distributions of the motions
(log-uniform size, uniform position, uniform angle; translations and zooms
bounce inside the same bounds), so a frame at *any* time has the same
distribution in every class: a single frame carries no label information and
the label has to be read off motion.  Container, codec and resolution follow
one fixed cycle that every class walks through, so they carry none either.

Everything is deterministic: each video's random generator is seeded from
``(seed, split, class, index)`` only (train and val never share a seed),
frames are rendered with numpy straight into the encoder's 4:2:0 planes (no
swscale), encoders run single-threaded with the bitexact flags set, and
muxers run with ``+bitexact`` (so Matroska/WebM do not write random UIDs and
no muxer writes creation times or library versions).  Byte identity holds for
the same FFmpeg/encoder builds (PyAV wheel); ``SAMPLE.json`` records them.

CLI::

    python -m shards.synthetic.render --out data/sample [--seed 0] \
        [--train-per-class 40] [--val-per-class 12] [--workers N]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["CLASSES", "SPLITS", "FORMATS", "RESOLUTIONS", "FPS_CHOICES", "generate", "render_clip", "main"]

#: Bump whenever the bytes written for the same parameters change.
GENERATOR_VERSION = 1

#: Class names in label order (label index = position in this tuple).
CLASSES: tuple[str, ...] = (
    "translate_horizontal",  # object moves left or right (random direction and speed, bounces)
    "translate_vertical",  # object moves up or down
    "rotate",  # object spins in place (random direction and angular speed)
    "zoom",  # object grows or shrinks in place (bounces between size limits)
    "still",  # object fixed in the frame; only the background moves
)

SPLITS: tuple[str, ...] = ("train", "val")

#: (extension, muxer, encoder, pixel format, encoder options).  Cycled so every
#: class gets every format.
_H264 = {"preset": "superfast", "crf": "23"}
_VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0", "row-mt": "0", "lag-in-frames": "0"}
FORMATS: tuple[tuple[str, str, str, str, dict[str, str]], ...] = (
    ("mp4", "mp4", "libx264", "yuv420p", _H264),
    ("webm", "webm", "libvpx-vp9", "yuv420p", _VP9),
    ("mkv", "matroska", "libx264", "yuv420p", _H264),
    ("avi", "avi", "mpeg4", "yuv420p", {"qmin": "5", "qmax": "5"}),  # fixed quantiser
    ("mkv", "matroska", "libvpx-vp9", "yuv420p", _VP9),
    ("mov", "mov", "mjpeg", "yuvj420p", {"qmin": "8", "qmax": "8"}),
)

_CODEC_NAMES = {"libx264": "h264", "libvpx-vp9": "vp9", "mpeg4": "mpeg4", "mjpeg": "mjpeg"}

#: (width, height): small, even, one portrait.
RESOLUTIONS: tuple[tuple[int, int], ...] = ((320, 240), (240, 320), (352, 288), (256, 256), (400, 224))

FPS_CHOICES: tuple[int, ...] = (12, 15, 24, 25, 30)
DURATION_RANGE_S: tuple[float, float] = (1.5, 4.0)

# Length of the (format, resolution) cycle: every combination once per period.
_CONFIG_PERIOD = math.lcm(len(FORMATS), len(RESOLUTIONS))

_BG_CONTRAST = (15.0, 32.0)  # background colour-noise amplitude (grey levels per unit of noise)
_SIZE_RANGE = (0.08, 0.2)  # object size s (area pi s^2) as a fraction of the short side
_SHAPES = ("disc", "square", "triangle", "ellipse")
# Shapes are described in object-local coordinates by a gauge function f (f <= 1 inside);
# all have area pi * s^2.  Per shape: "inradius" (turns f - 1 into an edge distance), in
# units of the object size s, and the vertices (polygons) for tight bounding boxes.
_SQ = math.sqrt(math.pi) / 2.0  # square half side
_TRI = math.sqrt(math.pi / (3.0 * math.sqrt(3.0) / 4.0))  # triangle circumradius
_ELL = (1.25, 0.8)  # ellipse semi-axes
_SHAPE_INRADIUS = {"disc": 1.0, "square": _SQ, "triangle": _TRI / 2.0, "ellipse": _ELL[1]}
_SHAPE_VERTS = {
    "square": np.array([[_SQ, _SQ], [_SQ, -_SQ], [-_SQ, _SQ], [-_SQ, -_SQ]]),
    "triangle": _TRI * np.array([[0.0, 1.0], [-math.sqrt(3) / 2, -0.5], [math.sqrt(3) / 2, -0.5]]),
}
_OBJ_TEX_BITS = 6
_OBJ_TEX = 1 << _OBJ_TEX_BITS  # object texture period (texels)
_OBJ_TEX_PER_UNIT = _OBJ_TEX / 2.5  # texels per unit of object-local coordinates


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, channels: int, h: int, w: int, sigma: float, down: int = 1) -> np.ndarray:
    """Periodic low-pass (Gaussian, std ``sigma`` px) noise ``[channels, h, w]``, zero mean and
    unit std per channel.  With ``down=2`` it is synthesised at half resolution and upsampled
    (linear, periodic): much cheaper and indistinguishable for ``sigma`` of a few px."""
    if down not in (1, 2) or h % down or w % down:
        raise ValueError("down must be 1 or 2 and divide h and w")
    hs, ws = h // down, w // down
    noise = rng.standard_normal((channels, hs, ws), dtype=np.float32)
    fy = np.fft.fftfreq(hs).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(ws).astype(np.float32)[None, :]
    filt = np.exp(np.float32(-2.0 * math.pi**2 * (sigma / down) ** 2) * (fy * fy + fx * fx))
    out = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(hs, ws)).astype(np.float32)
    if down == 2:
        mid = 0.5 * (out + np.roll(out, -1, axis=2))
        out = np.stack([out, mid], axis=3).reshape(channels, hs, w)
        mid = 0.5 * (out + np.roll(out, -1, axis=1))
        out = np.stack([out, mid], axis=2).reshape(channels, h, w)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + np.float32(1e-6)
    return out


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold ``x`` into ``[lo, hi]`` as if bouncing off the ends."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, (lo + hi) / 2.0)
    m = np.mod(x - lo, 2.0 * span)
    return lo + np.where(m > span, 2.0 * span - m, m)


# RGB -> Y'CbCr (BT.601), as (matrix rows, offset): limited ("tv") and full ("pc"/JPEG) range.
_YUV_MATRIX = np.array(
    [[0.299, 0.587, 0.114], [-0.299 / 1.772, -0.587 / 1.772, 0.5], [0.5, -0.587 / 1.402, -0.114 / 1.402]]
)
_YUV_LIMITED = (_YUV_MATRIX * np.array([[219.0], [224.0], [224.0]]) / 255.0, np.array([16.0, 128.0, 128.0]))
_YUV_FULL = (_YUV_MATRIX, np.array([0.0, 128.0, 128.0]))


class _Layer:
    """One image plane group to render: full-resolution RGB or Y, or half-resolution CbCr."""

    def __init__(self, bg: np.ndarray, obj_tex: np.ndarray, outline: np.ndarray, k: int, height: int, width: int):
        ph, pw = bg.shape[:2]
        self.k = k  # downscale factor of this layer (1 or 2)
        self.height, self.width = height, width
        self.period = (ph, pw)
        # Tile so any (ph, pw)-periodic window of the layer size (+1 for bilinear) is a slice.
        self.bg = np.ascontiguousarray(np.pad(bg, ((0, height + 1), (0, width + 1), (0, 0)), mode="wrap"))
        self.obj_tex = np.ascontiguousarray(obj_tex, dtype=np.float32)
        self.outline = outline.astype(np.float32)
        self.tmp = np.empty((height, width, bg.shape[2]), np.float32)


def _convert(rgb: np.ndarray, matrix: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    m, off = matrix  # explicit sums (no BLAS: no threads, same result everywhere)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([np.float32(off[j]) + np.float32(m[j, 0]) * r + np.float32(m[j, 1]) * g + np.float32(m[j, 2]) * b
                     for j in range(3)], axis=-1)


class _Scene:
    """All random parameters of one clip, drawn in a class-independent order, and its renderer."""

    def __init__(self, rng: np.random.Generator, cls: str, width: int, height: int, num_frames: int, fps: float):
        if cls not in CLASSES:
            raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
        if num_frames < 1 or width < 8 or height < 8 or fps <= 0:
            raise ValueError("need num_frames >= 1, width/height >= 8 and fps > 0")
        self.width, self.height = W, H = int(width), int(height)
        short = min(W, H)
        unit = short / 240.0  # texture scales follow the frame size

        # ---- shared appearance (same draws, same order, for every class) ----
        # Background: periodic smooth coloured noise, larger than the frame.
        ph, pw = int(math.ceil(H * 1.5 / 16) * 16), int(math.ceil(W * 1.5 / 16) * 16)
        bg_sigma = rng.uniform(3.0, 9.0) * unit
        n = _smooth_noise(rng, 3, ph, pw, bg_sigma, down=2)
        base = rng.uniform(50.0, 205.0, size=3).astype(np.float32)
        mix = (rng.standard_normal((3, 3)) * rng.uniform(*_BG_CONTRAST)).astype(np.float32)
        bg = base[None, None, :] + np.einsum("chw,dc->hwd", n, mix)
        self.bg_rgb = np.clip(bg, 0.0, 255.0).astype(np.float32)  # [ph, pw, 3]
        self.bg_origin = (rng.uniform(0, ph), rng.uniform(0, pw))
        bg_dir = rng.uniform(0.0, 2.0 * math.pi)
        bg_speed = rng.uniform(0.05, 0.2) * short  # px/s
        self.bg_velocity = (bg_speed * math.sin(bg_dir), bg_speed * math.cos(bg_dir))  # (y, x)

        # Object: shape, two-colour blobby texture with an outline, size, pose.
        self.shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        t = _smooth_noise(rng, 2, _OBJ_TEX, _OBJ_TEX, rng.uniform(2.5, 5.0))
        c1 = rng.uniform(0.0, 255.0, size=3)
        c2 = rng.uniform(0.0, 255.0, size=3)
        for _ in range(64):  # make the two colours clearly different (rotation must show)
            if np.linalg.norm(c1 - c2) >= 140.0:
                break
            c2 = rng.uniform(0.0, 255.0, size=3)
        sharp = rng.uniform(2.0, 5.0)
        p = 1.0 / (1.0 + np.exp(-sharp * t[0]))
        tex = c1[None, None, :] * (1.0 - p[..., None]) + c2[None, None, :] * p[..., None] + 12.0 * t[1][..., None]
        self.obj_rgb = np.clip(tex, 0.0, 255.0).astype(np.float32).reshape(-1, 3)  # [T*T, 3]
        self.outline_rgb = np.full(3, rng.choice([25.0, 230.0]), np.float32)
        # Size and position are drawn from the stationary distributions of the motions below
        # (log-uniform size, uniform position, uniform angle) and every motion keeps them
        # there (bounces within the same bounds), so the frame at *any* time, not just the
        # first, has the same distribution whatever the class.
        log_lo, log_hi = math.log(_SIZE_RANGE[0] * short), math.log(_SIZE_RANGE[1] * short)
        self.size0 = math.exp(rng.uniform(log_lo, log_hi))  # s: object "radius" in px (area pi s^2)
        margin = _SIZE_RANGE[1] * short
        self.x_range = (margin, W - margin)
        self.y_range = (margin, H - margin)
        x0 = rng.uniform(*self.x_range)
        y0 = rng.uniform(*self.y_range)
        a0 = rng.uniform(0.0, 2.0 * math.pi)

        # ---- motion parameters: all drawn for every class (fixed order) ----
        lin_speed = rng.uniform(0.7, 1.4) * 2.0 * self.size0 * rng.choice([-1.0, 1.0])  # px/s
        ang_speed = rng.uniform(1.6, 3.5) * rng.choice([-1.0, 1.0])  # rad/s (~90-200 deg/s)
        zoom_rate = rng.uniform(0.4, 0.8) * rng.choice([-1.0, 1.0])  # d log(size)/dt, 1/s

        ts = np.arange(num_frames, dtype=np.float64) / float(fps)
        cx = np.full(num_frames, x0)
        cy = np.full(num_frames, y0)
        ang = np.full(num_frames, a0)
        log_size = np.full(num_frames, math.log(self.size0))
        if cls == "translate_horizontal":
            cx = _reflect(x0 + lin_speed * ts, *self.x_range)
        elif cls == "translate_vertical":
            cy = _reflect(y0 + lin_speed * ts, *self.y_range)
        elif cls == "rotate":
            ang = a0 + ang_speed * ts
        elif cls == "zoom":
            log_size = _reflect(log_size + zoom_rate * ts, log_lo, log_hi)
        self.times = ts
        self.centre = np.stack([cx, cy], axis=1)  # (x, y) px; pixel (r, c) has its centre at (c+.5, r+.5)
        self.angle = ang
        self.scale = np.exp(log_size)
        self._layers: dict[str, list[_Layer]] = {}

    # ------------------------------------------------------------------ layers

    def layers(self, space: str) -> list[_Layer]:
        """``rgb``: one full-res RGB layer; ``yuv``/``yuvj``: Y' (full res) and CbCr (half res),
        BT.601 limited / full range, ready for a yuv420p / yuvj420p encoder."""
        if space not in self._layers:
            H, W = self.height, self.width
            if space == "rgb":
                layers = [_Layer(self.bg_rgb, self.obj_rgb, self.outline_rgb, 1, H, W)]
            elif space in ("yuv", "yuvj"):
                if W % 2 or H % 2:
                    raise ValueError("4:2:0 output needs even width and height")
                mat = _YUV_FULL if space == "yuvj" else _YUV_LIMITED
                bg = _convert(self.bg_rgb, mat)
                obj = _convert(self.obj_rgb, mat)
                outline = _convert(self.outline_rgb, mat)
                c = bg[:, :, 1:]
                bg_c = (c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) * np.float32(0.25)
                layers = [
                    _Layer(bg[:, :, :1], obj[:, :1], outline[:1], 1, H, W),
                    _Layer(bg_c, obj[:, 1:], outline[1:], 2, H // 2, W // 2),
                ]
            else:
                raise ValueError(f"unknown colour space {space!r}")
            self._layers[space] = layers
        return self._layers[space]

    # ------------------------------------------------------------------ frames

    def _background(self, i: int, L: _Layer) -> np.ndarray:
        """Bilinearly shifted window of the periodic background (fresh float32 array)."""
        H, W = L.height, L.width
        ph, pw = L.period
        t = self.times[i]
        oy = ((self.bg_origin[0] + self.bg_velocity[0] * t) / L.k) % ph
        ox = ((self.bg_origin[1] + self.bg_velocity[1] * t) / L.k) % pw
        iy, ix = int(oy), int(ox)
        fy, fx = float(oy - iy), float(ox - ix)
        b, tmp = L.bg, L.tmp
        out = np.multiply(b[iy : iy + H, ix : ix + W], np.float32((1 - fx) * (1 - fy)))
        np.multiply(b[iy : iy + H, ix + 1 : ix + W + 1], np.float32(fx * (1 - fy)), out=tmp)
        out += tmp
        np.multiply(b[iy + 1 : iy + H + 1, ix : ix + W], np.float32((1 - fx) * fy), out=tmp)
        out += tmp
        np.multiply(b[iy + 1 : iy + H + 1, ix + 1 : ix + W + 1], np.float32(fx * fy), out=tmp)
        out += tmp
        return out

    def _half_extent(self, s: float, ang: float) -> tuple[float, float]:
        """Half width/height (px) of the rotated shape's bounding box."""
        c, sn = math.cos(ang), math.sin(ang)
        if self.shape == "disc":
            return s, s
        if self.shape == "ellipse":
            a, b = _ELL
            return s * math.hypot(a * c, b * sn), s * math.hypot(a * sn, b * c)
        verts = _SHAPE_VERTS[self.shape]
        dx = np.abs(c * verts[:, 0] - sn * verts[:, 1]).max()
        dy = np.abs(sn * verts[:, 0] + c * verts[:, 1]).max()
        return s * float(dx), s * float(dy)

    def _object(self, i: int, L: _Layer) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """(rows, cols, alpha[h, w], colour[h, w, C]) of the object in frame ``i`` of layer ``L``."""
        k = L.k
        cx, cy = self.centre[i] / k
        s = float(self.scale[i]) / k  # object size in layer px
        ang = float(self.angle[i])
        hx, hy = self._half_extent(s, ang)
        x0, x1 = max(0, int(math.floor(cx - hx - 1.0))), min(L.width, int(math.ceil(cx + hx + 1.0)))
        y0, y1 = max(0, int(math.floor(cy - hy - 1.0))), min(L.height, int(math.ceil(cy + hy + 1.0)))
        if x0 >= x1 or y0 >= y1:
            return None
        dx = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
        c, sn = np.float32(math.cos(ang) / s), np.float32(math.sin(ang) / s)
        u = c * dx + sn * dy  # object-local coordinates (object size -> 1)
        v = c * dy - sn * dx
        if self.shape == "disc":
            f = np.sqrt(u * u + v * v)
        elif self.shape == "square":
            f = np.maximum(np.abs(u), np.abs(v))
            f *= np.float32(1.0 / _SQ)
        elif self.shape == "ellipse":
            f = np.sqrt(np.square(u * np.float32(1 / _ELL[0])) + np.square(v * np.float32(1 / _ELL[1])))
        else:  # triangle: max over the three edge normals / inradius
            q = np.float32(math.sqrt(3.0) / 2.0)
            qu, hv = q * u, np.float32(0.5) * v
            f = np.maximum(np.maximum(-v, qu + hv), hv - qu)
            f *= np.float32(2.0 / _TRI)
        # ~signed distance to the edge in layer px (negative inside)
        d = f
        d -= np.float32(1.0)
        d *= np.float32(s * _SHAPE_INRADIUS[self.shape])
        alpha = np.clip(np.float32(0.5) - d, 0.0, 1.0)
        # Nearest-texel lookup in object coordinates (texture period is a power of 2).
        iu = (u * np.float32(_OBJ_TEX_PER_UNIT)).astype(np.int32)  # truncation: fine, periodic
        iv = (v * np.float32(_OBJ_TEX_PER_UNIT)).astype(np.int32)
        iv &= _OBJ_TEX - 1
        iv <<= _OBJ_TEX_BITS
        iu &= _OBJ_TEX - 1
        iv |= iu
        col = L.obj_tex[iv]
        inner = np.clip(np.float32(-k) * d - np.float32(1.5), 0.0, 1.0)[..., None]  # ~2 px outline
        col -= L.outline
        col *= inner
        col += L.outline
        return slice(y0, y1), slice(x0, x1), alpha, col

    def render(self, i: int, L: _Layer, alpha_out: np.ndarray | None = None) -> np.ndarray:
        """Frame ``i`` of layer ``L`` as uint8 ``[h, w, C]``."""
        img = self._background(i, L)
        patch = self._object(i, L)
        if patch is not None:
            rows, cols, alpha, col = patch
            reg = img[rows, cols]
            col -= reg
            col *= alpha[..., None]
            reg += col
            if alpha_out is not None:
                alpha_out[rows, cols] = alpha
        img += np.float32(0.5)
        return img.astype(np.uint8)

    def frames(self) -> Iterator[np.ndarray]:
        """RGB frames, uint8 ``[H, W, 3]``."""
        (L,) = self.layers("rgb")
        for i in range(len(self.times)):
            yield self.render(i, L)

    def frames_yuv420(self, full_range: bool = False) -> Iterator[np.ndarray]:
        """Planar 4:2:0 frames as uint8 ``[H * 3 // 2, W]`` (Y', then Cb, then Cr), as PyAV's
        ``VideoFrame.from_ndarray(..., format="yuv420p")`` takes them."""
        ly, lc = self.layers("yuvj" if full_range else "yuv")
        H, W = self.height, self.width
        for i in range(len(self.times)):
            y = self.render(i, ly)
            cbcr = self.render(i, lc)
            out = np.empty(H * W * 3 // 2, np.uint8)
            out[: H * W] = y.reshape(-1)
            q = H * W // 4
            out[H * W : H * W + q] = cbcr[:, :, 0].reshape(-1)
            out[H * W + q :] = cbcr[:, :, 1].reshape(-1)
            yield out.reshape(H * 3 // 2, W)


def render_clip(
    rng: np.random.Generator,
    cls: str,
    width: int,
    height: int,
    num_frames: int,
    fps: float,
    *,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Render one clip of class ``cls`` as ``uint8 [num_frames, height, width, 3]`` RGB.

    With ``return_info=True`` also return a dict with the ground truth:
    ``alpha`` (float32 ``[F, H, W]`` object coverage), ``centre`` (``[F, 2]``
    x, y in px), ``scale`` (``[F]`` object size s in px; area = pi s^2),
    ``angle`` (``[F]`` radians), ``shape`` and ``background_velocity`` (y, x px/s).
    """
    scene = _Scene(rng, cls, width, height, num_frames, fps)
    (layer,) = scene.layers("rgb")
    out = np.empty((num_frames, scene.height, scene.width, 3), np.uint8)
    alphas = np.zeros((num_frames, scene.height, scene.width), np.float32) if return_info else None
    for i in range(num_frames):
        out[i] = scene.render(i, layer, None if alphas is None else alphas[i])
    if not return_info:
        return out
    info = {
        "alpha": alphas,
        "centre": scene.centre.copy(),
        "scale": scene.scale.copy(),
        "angle": scene.angle.copy(),
        "shape": scene.shape,
        "background_velocity": scene.bg_velocity,
    }
    return out, info


# --------------------------------------------------------------------------- encoding


def _encode(path: Path, scene: _Scene, fmt_index: int, fps: int) -> None:
    ext, muxer, codec, pix_fmt, options = FORMATS[fmt_index]
    width, height = scene.width, scene.height
    import av  # local import: keeps `render_clip` usable without PyAV

    container = av.open(
        str(path),
        "w",
        format=muxer,
        container_options={"fflags": "+bitexact", "flags": "+bitexact"},
    )
    try:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = Fraction(1, fps)
        cc = stream.codec_context
        cc.time_base = Fraction(1, fps)
        cc.thread_count = 1
        cc.gop_size = max(1, fps)  # a keyframe every second: cheap random access
        # Tag what the frames are: BT.601 (SMPTE 170M), limited range or full range (JPEG).
        full_range = pix_fmt == "yuvj420p"
        cc.color_range = 2 if full_range else 1
        cc.colorspace = cc.color_primaries = cc.color_trc = 6
        cc.options = {"flags": "+bitexact", "threads": "1", **options}
        # Frames are rendered straight into the encoder's 4:2:0 layout (BT.601; full range for
        # yuvj420p): no swscale conversion, so the bytes do not depend on its SIMD paths.
        for i, planes in enumerate(scene.frames_yuv420(full_range=full_range)):
            frame = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
            frame.color_range = cc.color_range
            frame.colorspace = frame.color_primaries = frame.color_trc = 6
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        container.close()


# --------------------------------------------------------------------------- dataset plan


def _video_rng(seed: int, split: str, cls_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), cls_index, index]))


def _clip_timing(rng: np.random.Generator) -> tuple[int, int]:
    """(fps, num_frames): the first draws of every video's generator."""
    fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
    duration = rng.uniform(*DURATION_RANGE_S)
    return fps, max(2, int(round(duration * fps)))


def _plan(seed: int, counts: dict[str, int]) -> list[dict[str, Any]]:
    """One task per video; the (format, resolution) cycle is the same list for
    every class, shifted per class and split so small datasets still cover it."""
    tasks = []
    for split_id, split in enumerate(SPLITS):
        for c, cls in enumerate(CLASSES):
            for i in range(counts[split]):
                j = (i + 7 * c + 8 * split_id) % _CONFIG_PERIOD
                fmt_index = j % len(FORMATS)
                width, height = RESOLUTIONS[j % len(RESOLUTIONS)]
                fps, num_frames = _clip_timing(_video_rng(seed, split, c, i))
                ext = FORMATS[fmt_index][0]
                tasks.append(
                    dict(
                        seed=int(seed), split=split, cls=cls, cls_index=c, index=i,
                        rel=f"videos/{split}/{cls}/{cls}_{i:04d}.{ext}",
                        fmt_index=fmt_index, width=width, height=height, fps=fps, num_frames=num_frames,
                    )
                )
    return tasks


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _scene_for(task: dict[str, Any]) -> _Scene:
    rng = _video_rng(task["seed"], task["split"], task["cls_index"], task["index"])
    _clip_timing(rng)  # replay the plan's draws so the scene gets the same stream
    return _Scene(rng, task["cls"], task["width"], task["height"], task["num_frames"], task["fps"])


def _make_video(task: dict[str, Any], out_dir: str) -> tuple[str, str, int]:
    scene = _scene_for(task)
    final = Path(out_dir) / task["rel"]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    try:
        _encode(tmp, scene, task["fmt_index"], task["fps"])
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return task["rel"], _sha256(final), final.stat().st_size


def _make_video_star(args: tuple[dict[str, Any], str]) -> tuple[str, str, int]:
    return _make_video(*args)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _params(seed: int, train_per_class: int, val_per_class: int) -> dict[str, Any]:
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "classes": list(CLASSES),
    }


def _is_complete(out: Path, params: dict[str, Any]) -> bool:
    marker = out / "SAMPLE.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator") != "tubelet.sample" or meta.get("params") != params:
        return False
    try:
        return all((out / rel).stat().st_size == entry["bytes"] for rel, entry in meta["files"].items())
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_per_class: int = 40,
    val_per_class: int = 12,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the sample dataset to ``out_dir`` (see module docstring) and return it.

    A no-op when ``out_dir/SAMPLE.json`` exists with the same parameters and
    all listed files are present with the recorded sizes.
    """
    out = Path(out_dir)
    if train_per_class < 0 or val_per_class < 0 or seed < 0:
        raise ValueError("seed and per-class counts must be >= 0")
    params = _params(seed, train_per_class, val_per_class)
    if _is_complete(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "SAMPLE.json"
    if marker.exists():
        marker.unlink()  # the folder is incomplete until the new marker lands

    t0 = time.perf_counter()
    tasks = _plan(seed, {"train": train_per_class, "val": val_per_class})
    # Longest first: better load balance for the pool.
    order = sorted(tasks, key=lambda t: -t["num_frames"] * t["width"] * t["height"])
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    n_workers = max(1, min(n_workers, len(tasks)))
    args = [(t, str(out)) for t in order]
    results: dict[str, tuple[str, int]] = {}

    bar = None
    if progress and tasks:
        try:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (the summary line still prints)
            bar = tqdm(total=len(tasks), desc=f"sample -> {out}", unit="video", file=sys.stderr, disable=None)
        except ImportError:
            bar = None
    try:
        if n_workers == 1:
            it = map(_make_video_star, args)
            pool = None
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = ctx.Pool(n_workers)
            it = pool.imap_unordered(_make_video_star, args, chunksize=1)
        try:
            for rel, digest, size in it:
                results[rel] = (digest, size)
                if bar is not None:
                    bar.update(1)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        if bar is not None:
            bar.close()

    # Remove stale videos (from an earlier, different generation) under videos/.
    expected = {t["rel"] for t in tasks}
    vids = out / "videos"
    if vids.is_dir():
        for p in sorted(vids.rglob("*")):
            if p.is_file() and p.relative_to(out).as_posix() not in expected:
                p.unlink()
        for p in sorted(vids.rglob("*"), reverse=True):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label"])
        for t in tasks:
            if t["split"] == split:
                w.writerow([t["rel"], t["cls"]])
        data = buf.getvalue().encode()
        _write_atomic(out / f"{split}.csv", data)
        files[f"{split}.csv"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    data = ("\n".join(CLASSES) + "\n").encode()
    _write_atomic(out / "classes.txt", data)
    files["classes.txt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for t in sorted(tasks, key=lambda t: t["rel"]):
        ext, _, encoder, pix_fmt, _ = FORMATS[t["fmt_index"]]
        digest, size = results[t["rel"]]
        files[t["rel"]] = {
            "sha256": digest,
            "bytes": size,
            "split": t["split"],
            "label": t["cls"],
            "container": ext,
            "codec": _CODEC_NAMES[encoder],
            "encoder": encoder,
            "pix_fmt": pix_fmt,
            "width": t["width"],
            "height": t["height"],
            "fps": t["fps"],
            "frames": t["num_frames"],
        }

    import av

    meta = {
        "generator": "tubelet.sample",
        "params": params,
        # informational: byte-identity holds for the same encoder libraries
        "libraries": {k: ".".join(map(str, v)) for k, v in sorted(av.library_versions.items())},
        "counts": {s: sum(1 for t in tasks if t["split"] == s) for s in SPLITS},
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }
    _write_atomic(marker, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    if progress:
        print(
            f"sample: {len(tasks)} videos, {meta['total_bytes'] / 1e6:.1f} MB in "
            f"{time.perf_counter() - t0:.1f}s with {n_workers} worker(s) -> {out}",
            file=sys.stderr,
        )
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.synthetic.render", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. data/sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--val-per-class", type=int, default=12)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    a = ap.parse_args(argv)
    out = generate(
        a.out,
        seed=a.seed,
        train_per_class=a.train_per_class,
        val_per_class=a.val_per_class,
        workers=a.workers,
        progress=not a.quiet,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
