from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import heic_photo
from PIL import Image

from catdogcnn import data as D


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_decode_resizes_to_rgb_uint8(synthetic_photo):
    arr = D.decode_image(encode(synthetic_photo(0, np.random.default_rng(0), 100), "JPEG"), 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_a_flat_photo_is_one_colour_within_a_standard_deviation():
    photos = np.full((3, 32, 32, 3), 128, np.uint8)
    photos[1, ::2] = 120  # rows of 120 and 128: standard deviation 4 in every channel, the cut itself
    photos[2, ::2, :, 2] = 118  # blue alone: rows of 118 and 128, standard deviation 5
    assert D.flat_photos(photos, 4.0).tolist() == [True, True, False]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb(mode, synthetic_photo):
    img = synthetic_photo(1, np.random.default_rng(1), 32)
    grey16 = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    img = grey16 if mode == "I;16" else img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "1" else "BMP"
    arr = D.decode_image(encode(img, fmt), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert 20 < arr.mean() < 235  # not crushed to black or white


def test_sixteen_bit_png_keeps_its_brightness():
    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    arr = D.decode_image(encode(Image.fromarray(grey), "PNG"))
    assert abs(int(arr[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert D.decode_image(encode(img, "PNG")).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # blue left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    arr = D.decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert arr.shape == (40, 20, 3)  # portrait now
    assert arr[5, 10, 2] > 200 and arr[35, 10, 0] > 200  # blue on top, red below


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_jpg_name_with_other_format_inside(tmp_path, fmt, synthetic_photo):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(synthetic_photo(0, np.random.default_rng(2), 48), fmt))
    assert D.decode_image(path, 32).shape == (32, 32, 3)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch, synthetic_photo):
    """decode_image asks Pillow for draft mode: a 2048 px JPEG is decoded at 1/8 scale for a 64 px answer, except
    with nearest resampling, which must see every pixel (as Keras does)."""
    from PIL import JpegImagePlugin

    path = tmp_path / "big.jpg"
    synthetic_photo(0, np.random.default_rng(3), 2048).save(path, quality=85)
    decoded_at = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        decoded_at.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    assert D.decode_image(path, 64).shape == (64, 64, 3)
    assert decoded_at[0] == (256, 256)
    decoded_at.clear()
    assert D.decode_image(path, 64, "nearest").shape == (64, 64, 3)
    assert decoded_at[0] == (2048, 2048)


def test_bad_files_each_get_a_one_line_reason(tmp_path, write_bad_files):
    expected = write_bad_files(tmp_path)
    for name, word in expected.items():
        with pytest.raises(D.BadImageError) as info:
            D.decode_image(tmp_path / name, 64)
        message = str(info.value)
        assert "\n" not in message and name in message and word in message, message


def test_unreadable_file_is_reported(tmp_path, monkeypatch, synthetic_photo):
    path = tmp_path / "locked.jpg"
    path.write_bytes(encode(synthetic_photo(0, np.random.default_rng(4), 16), "JPEG"))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the read refuse as it would for a normal user
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(D, "read_regular_file", refuse)
    with pytest.raises(D.BadImageError, match="permission denied"):
        D.decode_image(path, 16)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX feature")
def test_a_named_pipe_is_reported_not_waited_on(tmp_path, make_class_folder):
    make_class_folder(tmp_path, 2)
    os.mkfifo(tmp_path / "dogs" / "pipe.jpg")  # no writer: a plain open() would wait forever
    with pytest.raises(D.BadImageError, match="not a regular file"):
        D.decode_image(tmp_path / "dogs" / "pipe.jpg", 16)
    classes, samples = D.scan_folder(tmp_path)
    found = D.load_images(samples, classes, 32, cache_dir=False)
    assert len(found) == 4 and [Path(e.path).name for e in found.bad] == ["pipe.jpg"]
    assert D.file_digests([tmp_path / "dogs" / "pipe.jpg"]) == [None]


def test_load_images_skips_and_reports_bad_files(tmp_path, caplog, make_class_folder, write_bad_files):
    make_class_folder(tmp_path, 6)
    expected = write_bad_files(tmp_path / "dogs")
    classes, samples = D.scan_folder(tmp_path)
    found = D.load_images(samples, classes, 32, cache_dir=tmp_path / "cache")
    assert len(found) == 12 and len(found.bad) == len(expected)
    assert found.summary()["bad_files"] == len(expected)
    assert sorted(Path(e.path).name for e in found.bad) == sorted(expected)
    reported = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(reported) == len(expected)  # each reported once


def test_cache_is_reused_and_memory_mapped(tmp_path, monkeypatch, make_class_folder):
    make_class_folder(tmp_path / "photos", 5)
    classes, samples = D.scan_folder(tmp_path / "photos")
    first = D.load_images(samples, classes, 32, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(D, "decode_image", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = D.load_images(samples, classes, 32, cache_dir=tmp_path / "cache")
    assert isinstance(second.images, np.memmap) or isinstance(second.images.base, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.paths == first.paths and (second.labels == first.labels).all()


def test_cache_notices_a_changed_file(tmp_path, make_class_folder):
    make_class_folder(tmp_path / "photos", 3)
    classes, samples = D.scan_folder(tmp_path / "photos")
    first = D.load_images(samples, classes, 16, cache_dir=tmp_path / "cache")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(samples[0].path)
    os.utime(samples[0].path, ns=(1, 1))
    second = D.load_images(samples, classes, 16, cache_dir=tmp_path / "cache")
    assert not np.array_equal(first.images[0], second.images[0])


def test_layouts_and_stratified_split(tmp_path, seed_layout, make_class_folder):
    assert set(D.resolve_splits(seed_layout)) == {"train", "test"}
    assert D.evaluation_folder(seed_layout) == seed_layout / "test_set"
    plain = make_class_folder(tmp_path / "plain", 10, classes=("ant", "bee", "cow"))
    assert D.resolve_splits(plain) == {"train": plain}
    classes, samples = D.scan_folder(plain)
    assert classes == ["ant", "bee", "cow"]
    kept, held = D.stratified_split(samples, 0.3, seed=0)
    assert sorted(s.label for s in held) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert D.stratified_split(samples, 0.3, seed=0) == (kept, held)  # seeded
    assert not {s.path for s in kept} & {s.path for s in held}
    with pytest.raises(ValueError, match=r"too few photos to hold out 10% of 4 .*per class: 1, 3\)"):
        D.stratified_split(samples[9:13], 0.1, seed=0)  # one ant, three bees


def test_folder_without_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.resolve_splits(tmp_path)


def test_a_file_too_large_for_a_photo_is_refused_unread(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:  # sparse: no disk space used
        f.truncate(D.MAX_FILE_BYTES + 1)
    with pytest.raises(D.BadImageError, match="huge.jpg: .* too large for a photo") as info:
        D.decode_image(path, 16)
    assert info.value.kind == "bomb"
    with open(path, "rb") as f, pytest.raises(D.BadImageError, match="too large for a photo"):
        D.decode_image(f, 16)
    assert D.file_digests([path])[0] is not None  # `data check` still hashes it (streamed) for its duplicate report


def test_pixels_are_checked_from_the_header_before_decoding(png_with_size):
    with pytest.raises(D.BadImageError, match=r"too large: 7000 x 6000 pixels, more than the limit of 40,000,000"):
        D.decode_image(png_with_size(7000, 6000), 16, max_pixels=40_000_000)
    with pytest.raises(D.BadImageError) as corrupt:  # under the cap the fake header is what it is: corrupt
        D.decode_image(png_with_size(6000, 6000), 16, max_pixels=40_000_000)
    assert corrupt.value.kind != "bomb" and "too large" not in str(corrupt.value)


def test_pillows_process_wide_pixel_limit_is_left_alone():
    check = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import catdogcnn.data, catdogcnn.predict; "
             "print(before, Image.MAX_IMAGE_PIXELS)")
    before, after = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                                   check=True).stdout.split()
    assert before == after


PEAK_MEMORY = """
import resource, sys
from catdogcnn.data import decode_image
data = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert decode_image(data, 280).shape == (280, 280, 3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


@pytest.mark.parametrize("kind", ["palette", "palette with transparency", "16-bit grey"])
def test_a_16_megapixel_photo_of_a_few_kilobytes_decodes_in_bounded_memory(tmp_path, kind):
    """Palette and 16-bit photos once went through full-size RGBA and float64 copies: +260 MB and +430 MB for
    these 2-30 kB files. The decoded photo itself is 16-32 MB."""
    path = tmp_path / "big.png"
    if kind == "16-bit grey":
        Image.fromarray(np.zeros((4000, 4000), np.uint16)).save(path)
    else:
        image = Image.new("P", (4000, 4000), 1)
        image.save(path, **({"transparency": 1} if "transparency" in kind else {}))
    assert path.stat().st_size < 40_000
    peak_mb = float(subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True, text=True,
                                   check=True).stdout)
    assert peak_mb < 150, f"{kind}: +{peak_mb:.0f} MB to decode"


def test_palette_and_16_bit_photos_keep_their_pixels():
    """Transparency composited on white, 16-bit scaled to 8, the same as through full-size copies."""
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").convert("P")
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, 256, dtype=np.uint8)
    palette.putpalette(colours.tobytes())
    palette.info["transparency"] = alpha.tobytes()
    index = np.asarray(palette)
    a = alpha[index][..., None].astype(np.float64) / 255
    expected = colours[index] * a + 255 * (1 - a)
    assert np.abs(D.decode_image(palette).astype(np.float64) - expected).max() <= 1
    deep = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, "PNG")
    decoded = D.decode_image(buffer.getvalue())
    assert np.array_equal(decoded[..., 0], np.round(deep / 257).astype(np.uint8)) and (decoded[..., 0] ==
                                                                                       decoded[..., 2]).all()
    big_endian = io.BytesIO()  # 16-bit TIFFs come in either byte order
    Image.frombytes("I;16B", (40, 30), deep.astype(">u2").tobytes()).save(big_endian, "TIFF")
    assert np.array_equal(D.decode_image(big_endian.getvalue()), decoded)


def test_iphone_photos_are_read_and_turned_as_jpegs_are(tmp_path):
    data = heic_photo()
    assert data[4:12] == b"ftypheic"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    upright = D.decode_image(path)
    assert upright.shape == (40, 80, 3) and upright[20, 10, 2] > 150 and upright[20, 70, 0] > 150
    turned = D.decode_image(heic_photo(orientation=6))  # shot with the phone on its side: turned 90 degrees
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).save(jpeg, "JPEG", quality=95, exif=exif.tobytes())
    as_jpeg = D.decode_image(jpeg.getvalue())
    assert turned.shape == as_jpeg.shape == (80, 40, 3)
    assert np.abs(turned.astype(int) - as_jpeg).mean() < 8  # the same picture, the same way up


def test_a_damaged_heic_is_corrupt_not_unknown():
    with pytest.raises(D.BadImageError, match="corrupt image \\(starts like HEIC") as info:
        D.decode_image(heic_photo()[:200])
    assert info.value.kind != "not_image"


def test_header_pixels_give_the_declared_size_and_what_decoding_will_hold():
    def encoded(fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (4000, 3000), (9, 9, 9)).save(buffer, fmt, **options)
        return buffer.getvalue()

    assert D.header_pixels(encoded("JPEG"), 280) == (12_000_000, 500 * 375)  # decoded at 1/8 scale
    assert D.header_pixels(encoded("JPEG"), None) == (12_000_000, 12_000_000)
    assert D.header_pixels(encoded("JPEG", progressive=True), 280) == (12_000_000, 12_000_000)  # held at full size
    assert D.header_pixels(encoded("PNG"), 280) == (12_000_000, 12_000_000)
    assert D.header_pixels(b"not a photo", 280) == (0, 0)
