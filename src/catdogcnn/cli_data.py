"""`catdogcnn data ...`: look into a photo folder, download the data sets, lay out the seed's splits."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from catdogcnn.cli_common import fail, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Inspect a photo folder.")


@data_app.command("check")
@user_errors
def data_check(
    data_dir: Annotated[Path, typer.Argument(help="Seed layout or a folder of class folders.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    near_distance: Annotated[int, typer.Option(min=0, max=64, help="Max pHash bit distance for near-duplicates.")]
    = 4,
) -> None:
    """Counts per split and class, bad files, blank photos, exact duplicates (leakage, label conflicts),
    near-duplicates."""
    from catdogcnn.check import check_dataset

    report = check_dataset(data_dir, near_distance=near_distance)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    for split, counts in report.counts.items():
        typer.echo(f"{split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f" (total {sum(counts.values())})")
    listings = [("bad files", report.bad, str), ("blank photos (one flat colour)", report.blank, str),
                ("exact duplicates", report.exact_duplicates, lambda p: f"{p.a} = {p.b}  [{p.kind}]"),
                (f"near-duplicates (pHash distance <= {near_distance})", report.near_duplicates,
                 lambda p: f"{p.a} ~ {p.b}  [{p.kind}]")]
    for title, items, line in listings:
        typer.echo(f"{title}: {len(items)}" + (" pair(s)" if "duplicates" in title else ""))
        for item in items:
            typer.echo(f"  {line(item)}")


def _download_pets(dest: Path, url: str | None, sha256: str | None) -> None:
    """The Cats and Dogs archive, with a progress bar on a terminal; raises DownloadError."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from catdogcnn.download import download

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("downloading", total=None)
        root, moved = download(dest, url, sha256, lambda done, total: bar.update(task, completed=done, total=total))
    for path, reason in moved:
        typer.echo(f"moved aside {path}: {reason}", err=True)
    typer.echo(f"{root}: photos ready; {len(moved)} bad file(s) moved to {dest / 'rejected'} "
               f"(reasons in {dest / 'rejected' / 'reasons.tsv'})")


def _download_collection(name: str, dest: Path, jobs: int) -> bool:
    """One photo collection: a line per failed photo on stderr, then the summary; True when none failed."""
    from rich.progress import MofNCompleteColumn, Progress

    from catdogcnn.download import download_collection

    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(name, total=None)
        result = download_collection(name, dest, workers=jobs,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    for file, reason in result.failed:
        typer.echo(f"error: {file}: {reason}", err=True)
    typer.echo(f"{result.folder}: {len(result.fetched)} fetched, {len(result.present)} already there, "
               f"{len(result.failed)} failed")
    return not result.failed


@data_app.command("download")
@user_errors
def data_download(
    dest: Annotated[Path, typer.Option(help="Folder for the archive and the photos.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="Archive URL (default: $CATDOGCNN_DATA_URL, else Microsoft's "
                                            "kagglecatsanddogs_5340.zip).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the archive "
                                               "(default: $CATDOGCNN_DATA_SHA256, else the one recorded "
                                               "by an earlier download).")] = None,
    collection: Annotated[Literal["pets", "not_pets", "pet_breeds", "all"], typer.Option(
        help="pets: the Cats and Dogs archive; not_pets, pet_breeds: rebuild that photo folder in DEST from its "
             "manifest's pinned GitHub originals (a rerun fetches only the missing photos); all: the three.")]
    = "pets",
    jobs: Annotated[int, typer.Option(min=1, help="not_pets, pet_breeds: photos fetched at once.")] = 8,
) -> None:
    """Download the full Cats and Dogs archive (resumable), check, extract, and move bad photos aside; or the
    not_pets and pet_breeds photo folders."""
    from catdogcnn.download import COLLECTIONS, DownloadError

    failed = False
    if collection in ("pets", "all"):
        try:
            _download_pets(dest, url, sha256)
        except DownloadError as e:
            if collection == "pets":
                raise fail(str(e)) from None
            typer.echo(f"error: {e}", err=True)  # with `all`, the other collections still come
            failed = True
    for name in {"pets": [], "all": list(COLLECTIONS)}.get(collection, [collection]):
        failed = not _download_collection(name, dest, jobs) or failed
    if failed:
        raise typer.Exit(1)


@data_app.command("split")
@user_errors
def data_split(
    source: Annotated[Path, typer.Argument(help="Folder of class folders (e.g. data/PetImages).")],
    dest: Annotated[Path, typer.Option(help="Where to lay out training_set/test_set/extra_set.")],
    train: Annotated[int, typer.Option(min=1, help="Training photos per class.")] = 4000,
    test: Annotated[int, typer.Option(min=1, help="Test photos per class.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    extra: Annotated[bool, typer.Option("--extra/--no-extra", help="Put the remaining photos in extra_set.")]
    = True,
) -> None:
    """Lay out photos like the seed's data set (seeded): training_set/, test_set/ and extra_set/."""
    from catdogcnn.download import split

    for split_name, counts in split(source, dest, train, test, seed, extra).items():
        typer.echo(f"{dest / split_name}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
