"""The built-in sample's scenes: short synthetic clips of a textured object moving over a drifting background.

    render_clip(rng, "rotate", width=320, height=240, num_frames=48, fps=24)  ->  uint8 [48, 240, 320, 3]

Every clip shows a textured object over a textured background that drifts in a random direction at a random
speed. The class is *how the object moves* (see ``CLASSES``); every class is invariant to horizontal flips.
All appearance parameters (background, object shape/texture/colour/size/start position and orientation) are
drawn from the same distributions, in the same order, for every class, and the motion starts at ``t = 0``:
for one random generator state the first frame is *identical* whatever the class. Size, position and angle
are drawn from the stationary distributions of the motions (log-uniform size, uniform position, uniform angle;
translations and zooms bounce inside the same bounds), so a frame at *any* time has the same distribution in
every class: a single frame carries no label information and the label has to be read off motion.

`SceneStyle` holds the design knobs (object size range, background contrast); `Scene` draws one clip's
parameters and renders its frames as RGB or straight into 4:2:0 planes for an encoder (`frames_yuv420`);
`smooth_noise` is the periodic texture generator, public for other synthetic designs. The dataset (formats,
splits, files) is `shards.synthetic.generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

__all__ = ["CLASSES", "SceneStyle", "DEFAULT_STYLE", "Scene", "render_clip", "smooth_noise"]

#: Class names in label order (label index = position in this tuple).
CLASSES: tuple[str, ...] = (
    "translate_horizontal",  # object moves left or right (random direction and speed, bounces)
    "translate_vertical",  # object moves up or down
    "rotate",  # object spins in place (random direction and angular speed)
    "zoom",  # object grows or shrinks in place (bounces between size limits)
    "still",  # object fixed in the frame; only the background moves
)


@dataclass(frozen=True)
class SceneStyle:
    """The design knobs of the scenes. The defaults make the built-in sample (changing them changes its bytes)."""

    size_range: tuple[float, float] = (0.08, 0.2)  # object size s (area pi s^2) as a fraction of the short side
    bg_contrast: tuple[float, float] = (15.0, 32.0)  # background colour-noise amplitude (grey levels per unit)


DEFAULT_STYLE = SceneStyle()

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


def smooth_noise(rng: np.random.Generator, channels: int, h: int, w: int, sigma: float, down: int = 1) -> np.ndarray:
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


class Scene:
    """All random parameters of one clip, drawn in a class-independent order, and its renderer."""

    def __init__(self, rng: np.random.Generator, cls: str, width: int, height: int, num_frames: int, fps: float,
                 style: SceneStyle = DEFAULT_STYLE):
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
        n = smooth_noise(rng, 3, ph, pw, bg_sigma, down=2)
        base = rng.uniform(50.0, 205.0, size=3).astype(np.float32)
        mix = (rng.standard_normal((3, 3)) * rng.uniform(*style.bg_contrast)).astype(np.float32)
        bg = base[None, None, :] + np.einsum("chw,dc->hwd", n, mix)
        self.bg_rgb = np.clip(bg, 0.0, 255.0).astype(np.float32)  # [ph, pw, 3]
        self.bg_origin = (rng.uniform(0, ph), rng.uniform(0, pw))
        bg_dir = rng.uniform(0.0, 2.0 * math.pi)
        bg_speed = rng.uniform(0.05, 0.2) * short  # px/s
        self.bg_velocity = (bg_speed * math.sin(bg_dir), bg_speed * math.cos(bg_dir))  # (y, x)

        # Object: shape, two-colour blobby texture with an outline, size, pose.
        self.shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        t = smooth_noise(rng, 2, _OBJ_TEX, _OBJ_TEX, rng.uniform(2.5, 5.0))
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
        log_lo, log_hi = math.log(style.size_range[0] * short), math.log(style.size_range[1] * short)
        self.size0 = math.exp(rng.uniform(log_lo, log_hi))  # s: object "radius" in px (area pi s^2)
        margin = style.size_range[1] * short
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
    style: SceneStyle = DEFAULT_STYLE,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Render one clip of class ``cls`` as ``uint8 [num_frames, height, width, 3]`` RGB.

    With ``return_info=True`` also return a dict with the ground truth:
    ``alpha`` (float32 ``[F, H, W]`` object coverage), ``centre`` (``[F, 2]``
    x, y in px), ``scale`` (``[F]`` object size s in px; area = pi s^2),
    ``angle`` (``[F]`` radians), ``shape`` and ``background_velocity`` (y, x px/s).
    """
    scene = Scene(rng, cls, width, height, num_frames, fps, style)
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
