"""benchmarks/other_collections.py's hand-written readers of Debian packages and Qt resource files, on small
archives the tests write in those formats."""

from __future__ import annotations

import io
import lzma
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from other_collections import (  # noqa: E402
    GROUPS,
    Photo,
    answer_rows,
    deb_files,
    expected_answer,
    gcompris_photos,
    qt_resources,
    tuxpaint_photos,
    without_near_copies,
)

from catdogcnn.data import BadImageError
from catdogcnn.predict import Prediction


def make_deb(files: dict[str, bytes], name_end: str = "") -> bytes:
    """An `ar` archive laid out as dpkg writes one: debian-binary, control.tar.xz (here 7 bytes of filler: an odd
    size, padded to an even one), data.tar.xz; member names end in `name_end` ("/" as GNU ar writes them)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    members = {"debian-binary": b"2.0\n", "control.tar.xz": b"7 bytes",
               "data.tar.xz": lzma.compress(data.getvalue())}
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name + name_end:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" * (len(body) % 2)
    return out


def make_rcc(files: dict[str, tuple[bytes, int]], version: int = 3) -> bytes:
    """A Qt resource file holding `files` (path: (contents, flags: 0 stored, 1 zlib, 4 zstd)) under one folder
    level. Its parts in this order: header (24 bytes from version 3 on, with a flags word), names, data, tree;
    rcc puts data first, but a reader goes by the header's offsets. Entries take 14 bytes in version 1, 22 after
    (an 8-byte modification time)."""
    folders: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.rpartition("/")
        folders.setdefault(folder, []).append(name)
    names, name_at = b"", {}
    for name in [*folders, *(n for ns in folders.values() for n in ns)]:
        name_at[name] = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
    data, data_at = b"", {}
    for path, (body, flags) in files.items():
        stored = struct.pack(">I", len(body)) + zlib.compress(body) if flags == 1 else body
        data_at[path] = len(data)
        data += struct.pack(">I", len(stored)) + stored
    time = bytes(8) if version > 1 else b""
    entries = [struct.pack(">IHII", 0, 2, len(folders), 1) + time]  # the root folder
    children = len(folders) + 1
    for folder, items in folders.items():
        entries.append(struct.pack(">IHII", name_at[folder], 2, len(items), children) + time)
        children += len(items)
    for folder, items in folders.items():
        for name in items:
            path = f"{folder}/{name}"
            entries.append(struct.pack(">IHHHI", name_at[name], files[path][1], 0, 0, data_at[path]) + time)
    header = 24 if version >= 3 else 20
    names_at, data_start = header, header + len(names)
    offsets = struct.pack(">IIII", version, data_start + len(data), data_start, names_at)
    return b"qres" + offsets + (bytes(4) if version >= 3 else b"") + names + data + b"".join(entries)


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("name_end", ["", "/"])
def test_deb_files_reads_the_installed_files(name_end):
    files = {"usr/share/a.txt": b"odd", "usr/share/b/c.bin": b"even"}
    assert dict(deb_files(make_deb(files, name_end))) == files


def test_deb_files_refuses_a_package_without_data():
    deb = make_deb({})
    at = deb.index(b"data.tar.xz")
    with pytest.raises(ValueError, match="without its data.tar member"):
        list(deb_files(deb[:at] + b"dat0" + deb[at + 4:]))


def test_deb_files_refuses_other_files():
    with pytest.raises(ValueError, match="not a Debian package"):
        list(deb_files(b"PK\x03\x04 a zip file"))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_qt_resources_reads_stored_and_compressed_files(version):
    files = {"images/red.png": (png("red"), 1), "images/blue.png": (png("blue"), 0),
             "sounds/a.ogg": (b"ogg data", 0)}
    assert dict(qt_resources(make_rcc(files, version))) == {f"/{path}": body for path, (body, _) in files.items()}


@pytest.mark.parametrize(("rcc", "reason"), [
    (b"RIFF....", "not a Qt resource file"),
    (make_rcc({"a/b.png": (b"x", 0)}, 4), "version 4"),
    (make_rcc({"a/b.png": (b"x", 4)}), "zstd"),
])
def test_qt_resources_refuses_what_it_cannot_read(rcc, reason):
    with pytest.raises(ValueError, match=reason):
        list(qt_resources(rcc))


def test_gcompris_photos_groups_by_folder_and_names_pets():
    rcc = make_rcc({"gcompris/src/activities/erase/resource/kitten.webp": (png("orange"), 1),
                    "gcompris/src/activities/erase/resource/alpaca.webp": (png("white"), 1),
                    "gcompris/src/activities/lang/resource/words_sample/dog.webp": (png("brown"), 1),
                    "gcompris/src/activities/clickgame/resource/fish.webp": (png("blue"), 1)})
    photos = gcompris_photos(make_deb({"usr/share/gcompris-qt/rcc/erase.rcc": rcc}))
    assert [(p.name.rsplit("/", 1)[1], p.group, p.expected) for p in photos] == [
        ("kitten.webp", "pets", "cats"), ("alpaca.webp", "other animals", "neither"),
        ("dog.webp", "drawings (word pictures)", "dogs")]  # a folder of no group left out
    assert {p.group for p in photos} <= set(GROUPS)


def test_tuxpaint_photos_leave_out_cartoons():
    deb = make_deb({"usr/share/tuxpaint/stamps/animals/mammals/dogs/dog.png": png("grey"),
                    "usr/share/tuxpaint/stamps/animals/birds/owl.png": png("white"),
                    "usr/share/tuxpaint/stamps/animals/birds/cartoon/owl.png": png("yellow"),
                    "usr/share/tuxpaint/stamps/town/house.png": png("red")})
    assert sorted((p.name, p.group, p.expected) for p in tuxpaint_photos(deb)) == [
        ("tuxpaint/animals/birds/owl.png", "animals cut out (stamps)", "neither"),
        ("tuxpaint/animals/mammals/dogs/dog.png", "pets", "dogs")]


def test_near_copies_count_once_within_a_group():
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((256, 256))
    other = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((256, 256))
    photos = [Photo("big", "objects", "neither", scene), Photo("small", "objects", "neither", scene.resize((96, 96))),
              Photo("other", "objects", "neither", other), Photo("elsewhere", "raccoon", "neither", scene)]
    kept, dropped = without_near_copies(photos)
    assert [p.name for p in kept] == ["big", "other", "elsewhere"] and dropped == ["small"]


def test_expected_answer_in_words():
    grey = Image.new("RGB", (8, 8), "grey")
    assert expected_answer([Photo("a/cat.webp", "pets", "cats", grey)]) == "its class"
    assert expected_answer([Photo("a/owl.webp", "x", "neither", grey)]) == "neither"
    assert expected_answer([Photo("a/owl.webp", "x", "neither", grey),
                            Photo("a/dog.webp", "x", "dogs", grey)]) == "neither; its class for dog.webp"


class FakeClassifier:
    """Answers by the photo's colour: red is a cat, blue a dog, anything else neither; black cannot be read."""

    def predict(self, image: Image.Image) -> Prediction:
        colour = image.getpixel((0, 0))
        if colour == (0, 0, 0):
            raise BadImageError("<PIL image>", "cannot be read")
        label = {(255, 0, 0): "cats", (0, 0, 255): "dogs"}.get(colour, "neither")
        return Prediction("<PIL image>", label, 0.9)


def test_answer_rows_count_misses_and_unreadable_photos():
    def solid(colour: str) -> Image.Image:
        return Image.new("RGB", (8, 8), colour)

    photos = [Photo("p/cat", "pets", "cats", solid("red")), Photo("p/dog", "pets", "dogs", solid("red")),
              Photo("o/owl", "other animals", "neither", solid("white")),
              Photo("o/bad", "other animals", "neither", solid("black"))]
    rows, misses = answer_rows(FakeClassifier(), photos)
    by_group = {row[0]: row[1:] for row in rows}
    assert by_group["pets"] == ["2", "its class", "50.0% (1/2)"]
    assert by_group["other animals"] == ["2", "neither", "50.0% (1/2)"]
    assert by_group["raccoon"] == ["0", "neither", "n/a"]
    assert misses == ["p/dog: cats 0.900 (expected dogs)", "o/bad: error cannot be read"]
