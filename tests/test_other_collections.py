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

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from other_collections import GROUPS, deb_files, gcompris_photos, qt_resources, tuxpaint_photos  # noqa: E402


def make_deb(files: dict[str, bytes]) -> bytes:
    """An `ar` archive laid out as dpkg writes one: debian-binary, control.tar.xz (here 7 bytes of filler: an odd
    size, padded to an even one), data.tar.xz."""
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
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" * (len(body) % 2)
    return out


def make_rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A Qt resource file (format version 2) holding `files` (path: (contents, zlib-compressed?)) under one
    folder level, laid out as rcc writes it: header, names, data, then the tree of 22-byte entries."""
    folders: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.rpartition("/")
        folders.setdefault(folder, []).append(name)
    names, name_at = b"", {}
    for name in [*folders, *(n for ns in folders.values() for n in ns)]:
        name_at[name] = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
    data, data_at = b"", {}
    for path, (body, compressed) in files.items():
        stored = struct.pack(">I", len(body)) + zlib.compress(body) if compressed else body
        data_at[path] = len(data)
        data += struct.pack(">I", len(stored)) + stored
    entries = [struct.pack(">IHII", 0, 2, len(folders), 1) + bytes(8)]  # the root folder
    children = len(folders) + 1
    for folder, items in folders.items():
        entries.append(struct.pack(">IHII", name_at[folder], 2, len(items), children) + bytes(8))
        children += len(items)
    for folder, items in folders.items():
        for name in items:
            compressed = files[f"{folder}/{name}"][1]
            entries.append(struct.pack(">IHHHI", name_at[name], 1 if compressed else 0, 0, 0,
                                       data_at[f"{folder}/{name}"]) + bytes(8))
    header = 20
    names_at, data_start = header, header + len(names)
    tree_at = data_start + len(data)
    return b"qres" + struct.pack(">IIII", 2, tree_at, data_start, names_at) + names + data + b"".join(entries)


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def test_deb_files_reads_the_installed_files():
    files = {"usr/share/a.txt": b"odd", "usr/share/b/c.bin": b"even"}
    assert dict(deb_files(make_deb(files))) == files


def test_deb_files_refuses_other_files():
    with pytest.raises(ValueError, match="not a Debian package"):
        list(deb_files(b"PK\x03\x04 a zip file"))


def test_qt_resources_reads_stored_and_compressed_files():
    files = {"images/red.png": (png("red"), True), "images/blue.png": (png("blue"), False),
             "sounds/a.ogg": (b"ogg data", False)}
    assert dict(qt_resources(make_rcc(files))) == {f"/{path}": body for path, (body, _) in files.items()}


def test_qt_resources_refuses_other_files():
    with pytest.raises(ValueError, match="not a Qt resource file"):
        list(qt_resources(b"RIFF...."))


def test_gcompris_photos_groups_by_folder_and_names_pets():
    rcc = make_rcc({"gcompris/src/activities/erase/resource/kitten.webp": (png("orange"), True),
                    "gcompris/src/activities/erase/resource/alpaca.webp": (png("white"), True),
                    "gcompris/src/activities/erase/resource/alpaca_copy.webp": (png("white"), False),
                    "gcompris/src/activities/lang/resource/words_sample/dog.webp": (png("brown"), True),
                    "gcompris/src/activities/clickgame/resource/fish.webp": (png("blue"), True)})
    photos = gcompris_photos(make_deb({"usr/share/gcompris-qt/rcc/erase.rcc": rcc}))
    assert [(p.name.rsplit("/", 1)[1], p.group, p.expected) for p in photos] == [
        ("kitten.webp", "pets", "cats"), ("alpaca.webp", "other animals", "neither"),
        ("dog.webp", "drawings (word pictures)", "dogs")]  # the copy, and a folder of no group, left out
    assert {p.group for p in photos} <= set(GROUPS)


def test_tuxpaint_photos_leave_out_cartoons():
    deb = make_deb({"usr/share/tuxpaint/stamps/animals/mammals/dogs/dog.png": png("grey"),
                    "usr/share/tuxpaint/stamps/animals/birds/owl.png": png("white"),
                    "usr/share/tuxpaint/stamps/animals/birds/cartoon/owl.png": png("yellow"),
                    "usr/share/tuxpaint/stamps/town/house.png": png("red")})
    assert sorted((p.name, p.group, p.expected) for p in tuxpaint_photos(deb)) == [
        ("tuxpaint/animals/birds/owl.png", "animals cut out (stamps)", "neither"),
        ("tuxpaint/animals/mammals/dogs/dog.png", "pets", "dogs")]
