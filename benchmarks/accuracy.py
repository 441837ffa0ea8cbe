"""What each model bundle answers, on pets and on photos of neither class, and how fast: one markdown table.

    python benchmarks/accuracy.py [--data ../shared/data/cats_vs_dogs] [--not-pets ../shared/data/not_pets] \\
        [--pet-breeds ../shared/data/pet_breeds] [--bundle NAME=PATH ...] [--limit N] [--write docs/results.md]

A row per bundle: every shipped one (models/*), or those given with --bundle. Each predicts as it would for a
user (its own mirror averaging and "neither" rules), and every photo is read from its file.

- Pets: accuracy, log loss, expected calibration error (the reliability plot's bins) and the share answered
  "neither", on `test_set` and on the `extra_set` photos the bundle's run neither trained nor validated on
  (from its saved training config; "n/a" when it trained on all of extra_set).
- not_pets answered "neither": all of them; held-out photos of the kinds the bundle trained on; kinds it never
  saw, also per group of the folder's manifest (hard: wild cats, wild canids, bears...; other animals; scenes
  and objects). Which photos were held out is drawn again from the bundle's record (seed, shares); a bundle
  without that record never saw any, so all count as never seen.
- pet_breeds (pets of many breeds from other collections) answered "neither": held-out photos of the breeds
  the bundle trained on, breeds it never saw, cats and dogs of both, the right class, and the breeds turned
  away most; drawn again from the bundle's record as not_pets are. The held-out photos of trained kinds and
  breeds fitted and cut the bundle's rule: breeds and kinds never seen are the clean measure.
- Speed: photos/s labelling test_set photos from their files (`Classifier.predict_many`, in 10 timed runs of a
  tenth of them each: the rate at the mean time and its 95% t interval), and the median time of one photo file
  to label (`Classifier.predict`, 50 calls).

Every other rate comes with its 95% Wilson interval (scipy's `binomtest`). `--limit N` takes at most N photos of each
set, spread evenly over it, for a quick check. `--write FILE` also puts the table into FILE (e.g.
docs/results.md), replacing this benchmark's previous section there.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import os
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

from catdogcnn import data as D
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import NEITHER, Classifier
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import unused_extra
from catdogcnn.train.openset import breed_of, kind_of, split_by_kind

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference import time_folder, time_single  # noqa: E402  (a sibling script, not a package)
from results_page import (  # noqa: E402
    add_bundle_option,
    add_write_option,
    chosen_bundles,
    git_commit,
    processor,
    rate,
    write_section,
)

GROUPS = ("hard", "other", "scene")  # not_pets/manifest.csv's groups
LATENCY_CALLS = 50
FOLDER_RUNS = 10  # the test_set photos labelled in this many timed runs, for the throughput's interval


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the list (sorted by class, so both classes stay in)."""
    if not limit or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def linked_folder(samples: list[D.Sample], classes: list[str], folder: Path) -> Path:
    """A labelled folder (`folder/<class>/`) of links to these photos, for `evaluate`, which reads folders."""
    for sample in samples:
        (folder / classes[sample.label]).mkdir(parents=True, exist_ok=True)
        (folder / classes[sample.label] / sample.path.name).symlink_to(sample.path.resolve())
    return folder


def held_out_roles(folder: Path, metadata: dict, pets: bool = False) -> tuple[dict[Path, str], str]:
    """Each photo of `folder` (not_pets, or with `pets` pet_breeds) by what the bundle's training made of it:
    "train", "seen" (held-out photos of a trained kind or breed) or "unseen" (a kind or breed kept out); with a
    line saying where that comes from. Files that are not photos are left out, as training left them out before
    its draw."""
    listed = [p for p in D.list_files(folder) if not pets or len(p.relative_to(folder).parts) > 1]
    files = [path for path, result in zip(listed, D.decode_many(listed, None), strict=True)
             if not isinstance(result, D.BadImageError)]  # decoded as training decodes them: the same found bad
    entry = metadata.get("neither") or {}
    record = entry.get("pet_photos" if pets else "photos")
    what = "pet photos" if pets else "'neither' photos"
    if not record:
        return dict.fromkeys(files, "unseen"), f"no record of {what} in training: all count as never seen"
    config = metadata["training"]["config"]
    shares = ((config["pet_holdout_breeds"], config["pet_holdout_photos"]) if pets
              else (config["neither_holdout_kinds"], config["neither_holdout_photos"]))
    parts = split_by_kind(files, folder, *shares, record["seed"], kind=breed_of if pets else kind_of)
    # The same photo list as training hashed (see openset.load_neither), else the draw would not be the same.
    listing = hashlib.sha256("\n".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    unseen = record.get("unseen_breeds" if pets else "unseen_kinds", [])
    note = (f"{what}: held-out photos drawn again with seed {record['seed']}; "
            f"{len(unseen)} {'breeds' if pets else 'kinds'} never seen: {', '.join(unseen) or 'none'}")
    if listing != record["photos_sha256"]:
        note += f" (WARNING: {folder.name} is not the folder it trained on: the split is not its own)"
    return {path: role for role, paths in parts.items() for path in paths}, note


def neither_rates(clf: Classifier, roles: dict[Path, str], groups: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(answered "neither", photos) overall, per role ("seen", "unseen") and per group of the unseen kinds."""
    answered, total = Counter(), Counter()
    for path, prediction in zip(roles, clf.predict_many(list(roles)), strict=True):
        if not prediction.ok:
            print(f"skipped {prediction.error}", file=sys.stderr)
            continue
        keys = ["all", roles[path]] + ([groups.get(path.name, "?")] if roles[path] == "unseen" else [])
        for key in keys:
            total[key] += 1
            answered[key] += prediction.label == NEITHER
    return {key: (answered[key], total[key]) for key in total}


def breed_rates(clf: Classifier, roles: dict[Path, str], folder: Path) -> tuple[Counter, Counter, Counter]:
    """Of the pet photos not trained on: (answered "neither", photos, answered the right class) per key: the
    role ("seen", "unseen"), the class folder of those ("cats", "dogs"), "all", and each breed."""
    answered, total, right = Counter(), Counter(), Counter()
    photos = [path for path, role in roles.items() if role != "train"]
    for path, prediction in zip(photos, clf.predict_many(photos), strict=True):
        if not prediction.ok:
            print(f"skipped {prediction.error}", file=sys.stderr)
            continue
        animal = path.relative_to(folder).parts[0]
        is_right = (prediction.label or "").removesuffix("s") == animal.removesuffix("s")
        for key in ("all", roles[path], animal, breed_of(path, folder)):
            total[key] += 1
            answered[key] += prediction.label == NEITHER
            right[key] += is_right
    return answered, total, right


def worst_breeds(answered: Counter, total: Counter, shown: int = 6) -> str:
    """The breeds (with 5 photos or more not trained on) answered "neither" most, as "breed k/n"."""
    breeds = [key for key in total if "/" in key and total[key] >= 5 and answered[key]]
    breeds.sort(key=lambda key: (-answered[key] / total[key], -total[key]))
    return ", ".join(f"{key} {answered[key]}/{total[key]}" for key in breeds[:shown]) or "none"


def pet_columns(result: dict | None) -> list[str]:
    if result is None:
        return ["n/a"] * 4
    neither, n = result["neither"], result["n"]
    return [share((round(result["accuracy"] * n), n), 2), f"{result['log_loss']:.4f}", f"{result['ece']:.2%}",
            share((round(neither["pets_flagged"] * n), n), 2) if neither else "no rule"]


def share(counts: tuple[int, int] | None, digits: int = 1) -> str:
    """k/n as a percentage with its 95% Wilson interval."""
    from scipy.stats import binomtest

    if not counts or not counts[1]:
        return "n/a"
    k, n = counts
    low, high = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return f"{k / n:.{digits}%} [{low:.{digits}%}, {high:.{digits}%}] ({k}/{n})"


def bundle_row(name: str, path: Path, args: argparse.Namespace, groups: dict[str, str],
               tmp: Path) -> tuple[list, list, str]:
    """The tables' rows for one bundle (pets, not_pets and speed; pet_breeds), and notes on which photos of other
    collections it trained on."""
    clf = Classifier(path)
    print(f"{name}: {clf.model_id}", file=sys.stderr)

    classes, test_samples = D.scan_folder(D.evaluation_folder(args.data))
    test_samples = spread(test_samples, args.limit)
    test = evaluate(linked_folder(test_samples, classes, tmp / "test"), clf)
    config = clf.metadata.get("training", {}).get("config")
    extra_samples = spread(unused_extra(args.data, TrainConfig.from_dict(config)) if config else [], args.limit)
    extra = (evaluate(linked_folder(extra_samples, D.list_classes(D.resolve_splits(args.data)["train"]),
                                    tmp / "extra"), clf) if extra_samples else None)

    if test["neither"]:
        roles, note = held_out_roles(args.not_pets, clf.metadata)
        not_pets = spread([path for path in roles if path.name in groups], args.limit)  # photos, not the README
        rates = neither_rates(clf, {path: roles[path] for path in not_pets}, groups)
        neither = [share(rates.get(key)) for key in ("all", "seen", "unseen", *GROUPS)]
    else:
        note, neither = "no 'neither' rule", ["no rule"] * (3 + len(GROUPS))
    breeds_row, breeds_note = [name, f"`{clf.model_id}`", *["n/a"] * 7], "pet_breeds: not measured"
    if args.pet_breeds:
        pet_roles, breeds_note = held_out_roles(args.pet_breeds, clf.metadata, pets=True)
        chosen = spread(sorted(pet_roles), args.limit)
        answered, total, right = breed_rates(clf, {p: pet_roles[p] for p in chosen}, args.pet_breeds)
        counts = [(answered[key], total[key]) for key in ("seen", "unseen", "all", "cats", "dogs")]
        breeds_row = [name, f"`{clf.model_id}`", *(share(c) for c in counts), share((right["all"], total["all"])),
                      worst_breeds(answered, total)]

    photos = [s.path for s in test_samples]
    runs = [photos[i::FOLDER_RUNS] for i in range(FOLDER_RUNS)]
    per_photo_ms = [1000 / time_folder(lambda paths: sum(1 for _ in clf.predict_many(paths)), run) for run in runs]
    throughput = "{:.0f} [{:.0f}, {:.0f}]".format(*rate(per_photo_ms))
    latency_p50, _ = time_single(clf.predict, photos[:LATENCY_CALLS], LATENCY_CALLS)
    return ([name, f"`{clf.model_id}`", *pet_columns(test), *pet_columns(extra), *neither,
             throughput, f"{latency_p50:.1f}"], breeds_row, f"{name}: {note}; {breeds_note}")


def shown(path: Path) -> str:
    """A path as the table shows it: relative to the repository, never an absolute path of the machine it runs on."""
    return os.path.relpath(path.resolve(), ROOT)


def markdown(rows: list[list[str]], breed_rows: list[list[str]], notes: list[str], args: argparse.Namespace) -> str:
    header = ["model", "model_id",
              *[f"{where} {what}" for where in ("test_set", "unused extra_set")
                for what in ("accuracy", "log loss", "ECE", "pets answered neither")],
              "not_pets answered neither: all", "kinds seen, held-out photos", "kinds never seen",
              *[f"never seen: {group}" for group in GROUPS], "photos/s (folder) [95% interval]", "p50 ms (one photo)"]
    limit = f"; at most {args.limit} photos of each set (a quick check)" if args.limit else ""
    lines = [
        "### Accuracy, \"neither\" and speed of each bundle (`benchmarks/accuracy.py`)",
        "",
        f"{datetime.date.today().isoformat()}, commit {git_commit()}, {processor()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end; pets: {shown(args.data)}, "
        f"not pets: {shown(args.not_pets)}, pets of many breeds: "
        f"{shown(args.pet_breeds) if args.pet_breeds else 'none'}{limit}. Rates: value [95% Wilson interval] (k/n).",
        "",
        f"    {shlex.join(['python', *sys.argv])}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 2 + "---:|" * (len(header) - 2),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        "Pets of many breeds from other collections (pet_breeds), photos not trained on:",
        "",
        "| model | model_id | answered neither: trained breeds, held-out photos | breeds never trained on | all | "
        "cats | dogs | right class (all) | breeds answered neither most (5+ photos) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *["| " + " | ".join(row) + " |" for row in breed_rows],
        "",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--not-pets", type=Path, default=Path(os.environ.get("CATDOGCNN_NEITHER",
                                                                             ROOT.parent / "shared/data/not_pets")))
    default_breeds = Path(os.environ.get("CATDOGCNN_PETS", ROOT.parent / "shared/data/pet_breeds"))
    parser.add_argument("--pet-breeds", type=Path, default=default_breeds if default_breeds.is_dir() else None,
                        help="pets of many breeds (class folders of <breed>_<n>.jpg); skipped when absent")
    add_bundle_option(parser)
    parser.add_argument("--limit", type=int, metavar="N", help="at most N photos of each set")
    add_write_option(parser)
    args = parser.parse_args()
    bundles = chosen_bundles(parser, args)
    with open(args.not_pets / "manifest.csv", newline="") as f:
        groups = {row["file"]: row["group"] for row in csv.DictReader(f)}

    rows, breed_rows, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="accuracy") as tmp:
        for name, path in bundles.items():
            row, breed_row, note = bundle_row(name, path, args, groups, Path(tempfile.mkdtemp(dir=tmp)))
            rows.append(row)
            breed_rows.append(breed_row)
            notes.append(note)
    table = markdown(rows, breed_rows, notes, args)
    print(table)
    if args.write:
        write_section(args.write, "accuracy.py", table)
        print(f"written to {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
