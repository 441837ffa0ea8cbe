"""Untrusted bytes into the decode path used by training, `predict` and the server: a result or the one-line
BadImageError, never another exception. Bounded for CI; CATDOGCNN_FUZZ_EXAMPLES raises the count on demand."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import png_with_size
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from catdogcnn.data import MAX_IMAGE_PIXELS, BadImageError, decode_image

EXAMPLES = int(os.environ.get("CATDOGCNN_FUZZ_EXAMPLES", "300"))


def seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = seeds()


def decode_or_refuse(data: bytes) -> None:
    try:
        arr = decode_image(data, 32)
    except BadImageError as e:
        assert "\n" not in str(e)
        return
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


@given(seed=st.sampled_from(SEEDS), cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000),
                                                                                         st.integers(0, 255)),
                                                                               max_size=8))
@settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck), database=None)
def test_mutated_images(seed, cut, flips):
    decode_or_refuse(mutate(seed, cut, flips))


def mutate(seed: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """`seed` less its last `cut` bytes, then byte values set at positions (modulo the length)."""
    data = bytearray(seed[: max(1, len(seed) - cut)])
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data)


# (cut, flips) on the TIFF seed: damaged headers on which Pillow raised TypeError or OverflowError (found by the
# test above, about once in 50,000 mutations, before decode_image reported any decoder failure as corrupt).
TIFF_CASES = [(295, [(349, 30), (72, 11), (2890, 243), (745, 63), (3372, 118), (1767, 96), (2312, 114)]),
              (2127, [(72, 16), (2433, 246), (1365, 25), (2492, 20)]),
              (1542, [(2847, 156), (3316, 196), (2662, 127), (2298, 222), (72, 10), (1195, 85), (1138, 190)]),
              (1060, [(2616, 124), (72, 2), (1727, 10), (3285, 214), (1812, 208)])]


@pytest.mark.parametrize(("cut", "flips"), TIFF_CASES)
def test_damaged_tiff_headers_are_reported_as_corrupt(cut, flips):
    with pytest.raises(BadImageError, match="^<bytes>: corrupt image") as info:
        decode_image(mutate(SEEDS[-1], cut, flips), 32)
    assert info.value.kind == "corrupt" and "\n" not in str(info.value)


@given(data=st.binary(max_size=2000))
@settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck), database=None)
def test_random_bytes(data):
    decode_or_refuse(data)


@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@settings(max_examples=EXAMPLES // 3, deadline=2000, database=None)
def test_huge_declared_sizes_are_too_large_and_the_rest_corrupt(width, height):
    """A header with one pixel behind it: over the pixel limit it is refused as too large, before any decoding;
    under it, never "too large": a corrupt (truncated) photo, or (Pillow fills some thin ones) a decoded photo.
    Sizes between 4 MP and the limit are left out: under the limit a photo is decoded, so its pixels are paid for
    (seconds and hundreds of MB for a 100 MP claim), which is what a cap below the limit (the server's) is for."""
    assume(width * height <= 4_000_000 or width * height > MAX_IMAGE_PIXELS)
    try:
        decoded = decode_image(png_with_size(width, height), 32)
    except BadImageError as refused:
        message = str(refused)
        assert "\n" not in message
        if width * height > MAX_IMAGE_PIXELS:
            assert refused.kind == "bomb" and "too large" in message, message
        else:
            assert refused.kind in ("corrupt", "truncated") and "too large" not in message, message
    else:
        assert width * height <= MAX_IMAGE_PIXELS and decoded.shape == (32, 32, 3)
