"""One image -> a validated JPEG sample or a rejection: `make shards` with `kind=image`.

Checks, in order: empty or too large a file; not an image (PIL cannot identify it); more pixels than
`image.max_pixels` (a decompression bomb) or sides outside the filter's bounds; truncated or undecodable data
(the whole image is decoded, PIL's tolerance of truncated files off). Then the image is made plain RGB and
upright: EXIF orientation applied, CMYK, greyscale, palette and 16-bit converted, alpha composited on white.
Optionally scaled to a short side (`image.short_side`, never upscaled). Stored as JPEG, what DALI decodes on the
GPU with nvJPEG (and the hardware JPEG decoder where the GPU has one): an input that already is a baseline
RGB JPEG, upright, and not resized keeps its original bytes (no second lossy encode); others are encoded at
`image.quality`. Every stored sample is decoded back and must have the recorded size.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Dict, Tuple

from common.config import check
from shards.validate import Rejected

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
_ORIENTATION = 0x0112  # EXIF tag
_ROTATION = {3: 180, 6: 270, 8: 90}  # EXIF orientation -> degrees PIL's transpose turns (counter-clockwise)


@dataclass
class ImageConfig:
    """How images are stored (`make shards kind=image`)."""

    short_side: int = 0  # scale so the short side is this (never upscaled); 0 keeps the source size
    quality: int = 95  # JPEG quality of re-encoded images
    max_pixels: int = 89_478_485  # refuse larger images (PIL's decompression-bomb limit)

    def validate(self) -> None:
        check(self.short_side == 0 or 16 <= self.short_side <= 8192, "short_side", "must be 0 (keep) or 16..8192")
        check(1 <= self.quality <= 100, "quality", "must be in [1, 100]")
        check(self.max_pixels >= 256, "max_pixels", "must be >= 256")


def process_image(data: bytes, cfg: ImageConfig, flt) -> Tuple[bytes, Dict]:
    """(JPEG bytes, metadata) for one image's bytes, or Rejected. `flt`: shards.config.FilterConfig."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w0, h0 = img.size
    except UnidentifiedImageError:
        raise Rejected("not_an_image", "not an image format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise Rejected("bad_dimensions", str(e)) from None
    if w0 * h0 > cfg.max_pixels:
        raise Rejected("bad_dimensions", f"{w0}x{h0} = {w0 * h0} pixels > image.max_pixels={cfg.max_pixels}")
    if min(w0, h0) < flt.min_side or max(w0, h0) > flt.max_side:
        raise Rejected("bad_dimensions", f"{w0}x{h0} outside filter.min_side={flt.min_side} / "
                                         f"max_side={flt.max_side}")
    if max(w0, h0) > flt.max_aspect * min(w0, h0):
        raise Rejected("bad_dimensions", f"aspect {max(w0, h0) / min(w0, h0):.1f} > filter.max_aspect={flt.max_aspect}")
    orientation = img.getexif().get(_ORIENTATION, 1)
    mode = img.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken data streams
        reason = "truncated" if "truncated" in str(e) else "decode_error"
        raise Rejected(reason, f"{type(e).__name__}: {e}") from None
    upright = ImageOps.exif_transpose(img)
    rgb = _to_rgb(upright)
    w, h = rgb.size
    if cfg.short_side and min(w, h) > cfg.short_side:
        scale = cfg.short_side / min(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    keep = (fmt == "JPEG" and mode == "RGB" and orientation in (0, 1) and rgb.size == (w0, h0)
            and not img.info.get("progressive"))
    if keep:
        out = data
    else:
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=cfg.quality, subsampling=0 if cfg.quality >= 90 else 2)
        out = buf.getvalue()
    try:
        back = Image.open(io.BytesIO(out))
        back.load()
    except Exception as e:  # noqa: BLE001 - a sample that does not decode back is never stored
        raise Rejected("validation_failed", f"the stored JPEG does not decode: {e}") from None
    if back.size != (w, h) or back.mode != "RGB":
        raise Rejected("validation_failed", f"stored {w}x{h} RGB, decodes as {back.size} {back.mode}")
    meta = {"source_bytes": len(data), "source_codec": (fmt or "unknown").lower(), "source_width": w0,
            "source_height": h0, "source_mode": mode, "rotation": _ROTATION.get(orientation, 0),
            "width": w, "height": h, "codec": "jpeg", "reencoded": not keep}
    return out, meta


def _to_rgb(img):
    """Plain 8-bit RGB: alpha composited on white, CMYK/greyscale/palette/16-bit converted."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I"):  # 16- or 32-bit grey: scaled to 8 bits from its own range
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * 255.0 / top, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")
