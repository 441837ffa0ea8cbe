"""A model trained as a user would: a few cat breeds of pet_breeds, the finetune recipe, "neither" photos, a few
minutes on 2 cores; then what it answers for what it never learned: big cats and wild canids of not_pets that
its training held out, every dog of pet_breeds, and cats of other breeds.

    python benchmarks/breeds.py [--pet-breeds ../shared/data/pet_breeds] [--not-pets ../shared/data/not_pets] \\
        [--breeds bengal persian siamese] [--write docs/results.md]

Of each breed, 30 photos train (`training_set/`) and the rest go to `extra_set/`, half of which validates (the
"neither" cut is set on those) as training splits an `extra_set`. The recipe is the command line's
`train --recipe finetune` on EfficientNet-Lite0 with not_pets as "neither" photos (its held-out kinds and photos
drawn as usual). Rates come with their 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from catdogcnn import data as D
from catdogcnn.predict import NEITHER, Classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import held_out_roles, share  # noqa: E402  (sibling scripts, not a package)
from results_page import add_write_option, recorded  # noqa: E402

BIG_CATS = {"lion", "tiger", "cheetah", "puma", "leopard", "jaguar", "snow_leopard", "clouded_leopard", "caracal",
            "ocelot"}
WILD_CANIDS = {"fox", "wolf", "wild_canid"}
TRAINING_PHOTOS = 30  # of each breed; the rest validate
RECIPE = ["--model", "efficientnet_lite0", "--recipe", "finetune", "--train-blocks", "3", "--epochs", "6",
          "--batch-size", "64", "--optimizer", "adamw", "--lr", "1e-3", "--backbone-lr-scale", "0.1",
          "--schedule", "cosine", "--warmup-epochs", "0.3", "--augment", "crop", "--augment-views", "2",
          "--tta", "off", "--seed", "0"]


def breeds_folder(pet_breeds: Path, breeds: list[str], out: Path) -> Path:
    """The seed's layout of links: `training_set/<breed>/` (the first 30 photos) and `extra_set/<breed>/`."""
    for breed in breeds:
        photos = sorted((pet_breeds / "cats").glob(f"{breed}_*.jpg"))
        if len(photos) <= TRAINING_PHOTOS:
            sys.exit(f"{pet_breeds}: {breed} has {len(photos)} cat photos; more than {TRAINING_PHOTOS} are needed")
        for i, photo in enumerate(photos):
            folder = out / ("training_set" if i < TRAINING_PHOTOS else "extra_set") / breed
            folder.mkdir(parents=True, exist_ok=True)
            (folder / photo.name).symlink_to(photo.resolve())
    return out


def answered(clf: Classifier, photos: list[Path]) -> Counter:
    """How the model answered these photos: label -> count."""
    return Counter(p.label if p.ok else "unreadable" for p in clf.predict_many(photos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pet-breeds", type=Path, default=Path(os.environ.get(
        "CATDOGCNN_PETS", ROOT.parent / "shared/data/pet_breeds")))
    parser.add_argument("--not-pets", type=Path, default=Path(os.environ.get(
        "CATDOGCNN_NEITHER", ROOT.parent / "shared/data/not_pets")))
    parser.add_argument("--breeds", nargs="+", default=["bengal", "persian", "siamese"])
    add_write_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="breeds") as tmp:
        data = breeds_folder(args.pet_breeds, args.breeds, Path(tmp) / "breeds")
        command = [sys.executable, "-m", "catdogcnn", "train", str(data), *RECIPE,
                   "--neither-photos", str(args.not_pets), "--out", str(Path(tmp) / "run")]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        minutes = (time.perf_counter() - started) / 60
        clf = Classifier(Path(tmp) / "run" / "bundle")
        roles, _ = held_out_roles(args.not_pets, clf.metadata)
        held_out = {path: role for path, role in roles.items() if role != "train"}
        big_cats = [p for p in held_out if p.stem.rsplit("_", 1)[0] in BIG_CATS]
        canids = [p for p in held_out if p.stem.rsplit("_", 1)[0] in WILD_CANIDS]
        dogs = D.list_files(args.pet_breeds / "dogs")
        other_cats = [p for p in D.list_files(args.pet_breeds / "cats") if p.stem.rsplit("_", 1)[0] not in args.breeds]
        val = [p for breed in args.breeds for p in D.list_files(data / "extra_set" / breed)]
        val_right = sum(p.label == Path(p.source).parent.name for p in clf.predict_many(val))
        rows = [("big cats of not_pets held out of training", big_cats), ("wild canids of not_pets held out", canids),
                ("dogs of pet_breeds (all)", dogs), ("cats of other breeds of pet_breeds", other_cats)]
        with recorded(args.write, "breeds.py", "A model of three cat breeds, trained as a user would "
                                               "(`benchmarks/breeds.py`)"):
            print(f"Breeds {', '.join(args.breeds)}: {TRAINING_PHOTOS} photos each to train, the rest to validate; "
                  f"`catdogcnn train DATA {' '.join(RECIPE)} --neither-photos not_pets` took {minutes:.1f} min "
                  f"(decoding and caching included). Its photos of `extra_set` answered with their breed: "
                  f"{share((val_right, len(val)))}.\n")
            print("| photos | answered neither | most common other answers |")
            print("|---|---:|---|")
            for name, photos in rows:
                counts = answered(clf, photos)
                others = ", ".join(f"{label} {n}" for label, n in counts.most_common() if label != NEITHER)
                print(f"| {name} | {share((counts[NEITHER], sum(counts.values())))} | {others or 'none'} |")


if __name__ == "__main__":
    main()
