"""Any Pillow mode to 8-bit RGB, in memory bounded by the photo's own size: 16-bit, 32-bit and float grey photos
scaled a strip at a time, transparency composited on white a strip at a time, palettes composited once per
colour. The pixels are those of the plain full-size conversions, without their full-size float or RGBA copies
(a 16 MP palette PNG of 2 kB once cost 260 MB to decode, a 16-bit one 430 MB)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

STRIP_PIXELS = 1 << 20  # wide-range grey photos are brought to 8 bits a strip of about this many pixels at a time


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey photo as 8-bit "L", scaled to its range (16-bit: 65535, float: its peak),
    a strip of rows at a time: no full-size float copy (a 16 MP 16-bit PNG cost 430 MB that way)."""
    width, height = img.size
    rows = max(1, STRIP_PIXELS // max(1, width))

    def strips() -> Iterator[tuple[int, np.ndarray]]:  # numpy reads every 16-bit order (getextrema does not)
        for y in range(0, height, rows):
            yield y, np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.float32)

    peak = max((float(strip.max(initial=0)) for _, strip in strips()), default=0.0)
    peak = max(1.0, peak) if img.mode == "F" else (65535.0 if peak > 255 else 255.0)
    scale = np.float32(255.0 / peak)
    out = np.empty((height, width), np.uint8)
    for y, strip in strips():
        out[y:y + strip.shape[0]] = np.clip(strip * scale + 0.5, 0, 255)
    return Image.fromarray(out, "L")


def _on_white(img: Image.Image) -> Image.Image:
    """An image with transparency composited on white, as a viewer shows it (RGB out). A strip of rows at a time:
    the same pixels as compositing the whole image, without three full-size RGBA copies beside it."""
    width, height = img.size
    rows = max(1, STRIP_PIXELS // max(1, width))
    out = Image.new("RGB", img.size)
    for y in range(0, height, rows):
        strip = img.crop((0, y, width, min(height, y + rows))).convert("RGBA")
        background = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(background, strip).convert("RGB"), (0, y))
    return out


def _palette_to_rgb(img: Image.Image) -> Image.Image:
    """A palette photo as RGB. With transparency, the palette's 256 colours are composited on white rather
    than every pixel: the same pixels as compositing the whole image, without full-size RGBA copies."""
    if "transparency" in img.info:
        lut = Image.new("P", (256, 1))
        lut.putdata(range(256))
        lut.putpalette(img.getpalette("RGB"), "RGB")
        lut.info["transparency"] = img.info["transparency"]
        img = img.copy() if img.readonly else img
        img.putpalette(_on_white(lut).tobytes(), "RGB")
        img.info.pop("transparency")
    return img.convert("RGB")


def to_rgb(img: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, as a viewer shows it. `keep_grey`: a grey
    photo stays 8-bit "L", for a caller that resizes it first (the same pixels as resizing its RGB copy, as the
    three channels are equal, for a third of the memory)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _grey_to_8bit(img)
    if img.mode == "P":
        return _palette_to_rgb(img)
    if img.mode in ("LA", "PA", "RGBA", "RGBa") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        return _on_white(img)
    return img if img.mode == "RGB" or (keep_grey and img.mode == "L") else img.convert("RGB")
