"""Photos from collections this project never trained or tuned on, answered by each shipped bundle.

    python benchmarks/other_collections.py [--bundle NAME=PATH ...] [--cache DIR] [--write docs/results.md]

The photos are real photographs that other free software ships, fetched once (about 285 MB, pinned files
checked by SHA-256) into `--cache` (default: `other_collections` in catdogcnn's cache, `$CATDOGCNN_CACHE` or
`~/.cache/catdogcnn`):

- GCompris's photos (Debian's `gcompris-qt-data` 3.1-2, inside Qt resource files): a cat, a dog and a kitten;
  other animals (farm and wild animals, birds, fishes, insects); objects, buildings and monuments. And, apart,
  its drawings for words (animals, people, fruit, numbers): not photos, but what some users will upload.
- Tux Paint's animal stamps (Debian's `tuxpaint-stamps-default` 2022.06.04-1): mostly photographs of animals
  cut out on a transparent background (so on white, as a viewer shows them), a husky among them.
- MATE's nature wallpapers (Debian's `mate-backgrounds` 1.26.0-1, `nature/`): a dune, a meadow, flowers,
  rain drops, a storm, wood.
- scipy's raccoon (`scipy.misc.face`, shipped inside scipy 1.9.3's wheel).

Should Debian move a package out of its pool, https://snapshot.debian.org keeps every version of it.

Pets (a drawn cat or dog too) count as answered right when labelled with their class, everything else when
answered `neither`. The photos' kinds come from their file names in those packages, so the sets are the same on
every machine; near-copies (the same photo at two sizes) count once. The answers that are not the expected ones
are listed (the first 12). A user's uploads come from other collections than the training photos, as these do;
they hold only 4 photos of pets, so they test the "neither" answer far more than cat-vs-dog accuracy.
"""

from __future__ import annotations

import argparse
import bz2
import io
import os
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from catdogcnn.bundle import BundleError
from catdogcnn.data import BadImageError, decode_image, default_cache_dir
from catdogcnn.download import DownloadError, sha256_of
from catdogcnn.download import fetch as download_to
from catdogcnn.predict import NEITHER, Classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_page import add_bundle_option, add_write_option, chosen_bundles, recorded  # noqa: E402  (a sibling)

DEBIAN = "http://deb.debian.org/debian/pool/main"


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str


GCOMPRIS = Download(f"{DEBIAN}/g/gcompris-qt/gcompris-qt-data_3.1-2_all.deb",
                    "e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f")
TUXPAINT = Download(f"{DEBIAN}/t/tuxpaint-stamps/tuxpaint-stamps-default_2022.06.04-1_all.deb",
                    "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34")
MATE = Download(f"{DEBIAN}/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb",
                "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04")
SCIPY = Download("https://files.pythonhosted.org/packages/92/f9/7ae2c1ae200212bc84b5a8369a10d644aa8b588140fe292d59db3b4a2545/"
                 "scipy-1.9.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "abaf921531b5aeaafced90157db505e10345e45038c39e5d9b6c7922d68085cb")

PETS = {"cat": "cats", "kitten": "cats", "dog": "dogs"}  # the packages' file names of pets, and their class
# GCompris's activities whose pictures are photographs, by group, and one of drawings (animals, people, fruit).
GCOMPRIS_FOLDERS = {
    "other animals": ["erase/resource", "explore_farm_animals/resource/animals",
                      "explore_world_animals/resource/animals", "categorization/resource/images/fishes"],
    "objects, buildings, monuments": ["categorization/resource/images/tools",
                                      "categorization/resource/images/renewable",
                                      "categorization/resource/images/monuments",
                                      "categorization/resource/images/others", "explore_monuments/resource"],
    "drawings (word pictures)": ["lang/resource/words_sample"],
}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GROUPS = ["pets", "other animals", "animals cut out (stamps)", "raccoon", "nature (wallpapers)",
          "objects, buildings, monuments", "drawings (word pictures)"]
MISSES_LISTED = 12


@dataclass
class Photo:
    name: str  # where it comes from, as the table shows it
    group: str
    expected: str  # a class, or "neither"
    image: Image.Image


def fetch(download: Download, cache: Path) -> bytes:
    """The file, from the cache or else downloaded (resumed and retried as `catdogcnn data download` does); a
    download takes its name in the cache only once its SHA-256 is the pinned one."""
    path = cache / download.url.rsplit("/", 1)[1]
    if not path.exists():
        unchecked = path.with_name(path.name + ".unchecked")
        try:
            download_to(download.url, unchecked)
        except DownloadError as e:
            sys.exit(f"{e} (every Debian version stays on https://snapshot.debian.org)")
        if sha256_of(unchecked) != download.sha256:
            unchecked.unlink()
            sys.exit(f"{download.url}: SHA-256 is not the pinned one (the file changed on the server)")
        os.replace(unchecked, path)
    if sha256_of(path) != download.sha256:
        sys.exit(f"{path}: SHA-256 is not the pinned one (a changed file: delete it to download it again)")
    return path.read_bytes()


def deb_files(deb: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, contents) of the files a Debian package installs.

    A .deb is an `ar` archive holding data.tar.*; `ar` is read by hand (a header of 60 bytes per member), as
    the standard library has no reader and dpkg-deb is not installed everywhere."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package")
    at, found = 8, False
    while at < len(deb):
        name, size = deb[at:at + 16].decode().strip().rstrip("/"), int(deb[at + 48:at + 58].decode())
        if name.startswith("data.tar"):
            found = True
            with tarfile.open(fileobj=io.BytesIO(deb[at + 60:at + 60 + size]), mode="r:*") as tar:
                for info in tar:
                    if info.isfile():
                        yield info.name.removeprefix("./"), tar.extractfile(info).read()
        at += 60 + size + size % 2  # members are padded to an even length
    if not found:
        raise ValueError("a Debian package without its data.tar member")


def qt_resources(rcc: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, contents) of the files in a Qt resource file (.rcc): its tree of names, and each file's data,
    zlib-compressed or stored. Written by hand: no library this project depends on reads the format."""
    if rcc[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", rcc[4:20])
    if version not in (1, 2, 3):
        raise ValueError(f"Qt resource format version {version}, not 1 to 3")
    entry = 14 if version == 1 else 22  # version 2 added an 8-byte modification time; 3, header flags

    def name(offset: int) -> str:
        length = struct.unpack(">H", rcc[names + offset:names + offset + 2])[0]
        return rcc[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        at = tree + index * entry
        name_offset, flags = struct.unpack(">IH", rcc[at:at + 6])
        path = f"{prefix}/{name(name_offset)}" if index else ""
        if flags & 2:  # a folder: its children's count and first index
            count, first = struct.unpack(">II", rcc[at + 6:at + 14])
            for child in range(first, first + count):
                yield from walk(child, path)
            return
        offset = struct.unpack(">I", rcc[at + 10:at + 14])[0]
        size = struct.unpack(">I", rcc[data + offset:data + offset + 4])[0]
        body = rcc[data + offset + 4:data + offset + 4 + size]
        if flags & 4:
            raise ValueError(f"{path}: zstd-compressed, not read here")
        yield path, zlib.decompress(body[4:]) if flags & 1 else body  # zlib data starts with its length

    yield from walk(0, "")


def gcompris_photos(deb: bytes) -> list[Photo]:
    photos = []
    for path, rcc in deb_files(deb):
        if not path.endswith(".rcc"):
            continue
        for name, body in qt_resources(rcc):
            if not name.lower().endswith(PHOTO_SUFFIXES):
                continue
            where = name.split("/activities/", 1)[-1]
            stem = Path(name).stem.lower()
            group = next((g for g, folders in GCOMPRIS_FOLDERS.items()
                          if any(where.startswith(f + "/") for f in folders)), None)
            if stem in PETS and group == "other animals":
                group = "pets"
            if group:
                photos.append(Photo(f"gcompris/{where}", group, PETS.get(stem, NEITHER), Image.open(io.BytesIO(body))))
    return photos


def tuxpaint_photos(deb: bytes) -> list[Photo]:
    """Tux Paint's animal stamps: photographs cut out on a transparent background (`cartoon/` folders left out)."""
    photos = []
    for path, body in deb_files(deb):
        if "/stamps/animals/" in path and "/cartoon/" not in path and path.endswith(".png"):
            stem = Path(path).stem.lower()
            photos.append(Photo(f"tuxpaint/{path.split('/stamps/', 1)[1]}",
                                "pets" if stem in PETS else "animals cut out (stamps)", PETS.get(stem, NEITHER),
                                Image.open(io.BytesIO(body))))
    return photos


def mate_photos(deb: bytes) -> list[Photo]:
    return [Photo(f"mate/{Path(path).name}", "nature (wallpapers)", NEITHER, Image.open(io.BytesIO(body)))
            for path, body in deb_files(deb)
            if "/backgrounds/mate/nature/" in path and path.lower().endswith(PHOTO_SUFFIXES)]


def scipy_raccoon(wheel: bytes) -> Photo:
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:  # 1024 x 768 RGB, bz2-compressed raw bytes
        raw = bz2.decompress(archive.read("scipy/misc/face.dat"))
    image = Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(768, 1024, 3))
    return Photo("scipy/misc/face.dat", "raccoon", NEITHER, image)


def collect(cache: Path) -> list[Photo]:
    return [*gcompris_photos(fetch(GCOMPRIS, cache)), *tuxpaint_photos(fetch(TUXPAINT, cache)),
            *mate_photos(fetch(MATE, cache)), scipy_raccoon(fetch(SCIPY, cache))]


def without_near_copies(photos: list[Photo]) -> tuple[list[Photo], list[str]]:
    """The photos with each near-copy left out (within a group, a photo whose 32 px grey thumbnail differs from
    an earlier one's by less than 2 of 255 on average: the same photo at another size), and the names left out."""
    kept, thumbnails, dropped = [], [], []
    for photo in photos:
        thumbnail = decode_image(photo.image, 32).mean(axis=2)
        if any(group == photo.group and np.abs(thumbnail - other).mean() < 2 for group, other in thumbnails):
            dropped.append(photo.name)
            continue
        kept.append(photo)
        thumbnails.append((photo.group, thumbnail))
    return kept, dropped


def expected_answer(photos: list[Photo]) -> str:
    """What a group's photos should be answered, in words."""
    pets = [Path(photo.name).name for photo in photos if photo.expected != NEITHER]
    if not pets:
        return NEITHER
    return "its class" if len(pets) == len(photos) else f"{NEITHER}; its class for {', '.join(pets)}"


def answer_rows(clf: Classifier, photos: list[Photo]) -> tuple[list[list[str]], list[str]]:
    """A row per group (photos, what is expected, the share answered so) and the photos answered otherwise."""
    rows, misses = [], []
    for group in GROUPS:
        members, right = [photo for photo in photos if photo.group == group], 0
        for photo in members:
            try:
                prediction = clf.predict(photo.image)
            except BadImageError as e:
                misses.append(f"{photo.name}: error {e.reason}")
                continue
            right += prediction.label == photo.expected
            if prediction.label != photo.expected:
                misses.append(f"{photo.name}: {prediction.label} {prediction.confidence:.3f} "
                              f"(expected {photo.expected})")
        share = f"{right / len(members):.1%} ({right}/{len(members)})" if members else "n/a"
        rows.append([group, str(len(members)), expected_answer(members), share])
    if len(misses) > MISSES_LISTED:
        misses = [*misses[:MISSES_LISTED], f"and {len(misses) - MISSES_LISTED} more"]
    return rows, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_option(parser)
    parser.add_argument("--cache", type=Path, default=default_cache_dir() / "other_collections",
                        help="where the downloaded packages are kept")
    add_write_option(parser)
    args = parser.parse_args()
    try:  # the bundles first: a wrong path is said before any download
        classifiers = {name: Classifier(path) for name, path in chosen_bundles(parser, args).items()}
    except BundleError as e:
        sys.exit(str(e))
    title = "Photos from other collections (`benchmarks/other_collections.py`)"
    with recorded(args.write, "other_collections.py", title):
        photos, near_copies = without_near_copies(collect(args.cache))
        print(f"{len(photos)} photos; near-copies counted once, left out: {', '.join(near_copies) or 'none'}\n")
        for name, clf in classifiers.items():
            if not clf.neither_cuts:
                print(f"{name} (`{clf.model_id}`): no 'neither' rule, left out\n")
                continue
            rows, misses = answer_rows(clf, photos)
            print(f"{name} (`{clf.model_id}`)\n")
            print("| group | photos | expected | answered as expected |\n|---|---:|---|---:|")
            print("\n".join("| " + " | ".join(row) + " |" for row in rows))
            print("\nNot as expected: " + ("; ".join(misses) if misses else "none") + "\n")


if __name__ == "__main__":
    main()
