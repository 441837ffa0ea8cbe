"""`catdogcnn sort`: a folder of photos sorted into one folder per class and `neither/` (see sort.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from catdogcnn.cli_common import ModelOption, fail, user_errors


@user_errors
def sort(
    photos: Annotated[list[Path], typer.Argument(help="Photos and/or folders of photos.")],
    into: Annotated[Path, typer.Option(help="Where the class folders go (INTO/cats/, INTO/dogs/, INTO/neither/); "
                                       "INTO/sorted.csv records what went where.")],
    copy: Annotated[bool, typer.Option("--copy", help="Copy the photos (the default).")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link them (a symbolic link across file systems).")]
    = False,
    move: Annotated[bool, typer.Option("--move", help="Move them; safe to kill at any moment: a rerun finishes "
                                       "the job.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print what would go where; touch nothing.")] = False,
    model: ModelOption = None,
) -> None:
    """Sort photos into one folder per class and neither/; unreadable photos are listed, never moved. Never
    overwrites: a name taken gets a suffix. A rerun skips the photos already sorted."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress
    from rich.table import Table

    from catdogcnn.predict import expand_photos, load_classifier
    from catdogcnn.sort import UNREADABLE, sort_photos

    if copy + link + move > 1:
        raise fail("give one of --copy, --link, --move")
    mode = "move" if move else "link" if link else "copy"
    classifier = load_classifier(model)
    console = Console(stderr=True)
    total = len(expand_photos(photos))
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console, transient=True,
                  disable=not console.is_terminal or total < 100) as bar:
        task = bar.add_task("sorting", total=total)
        summary = sort_photos(classifier, photos, into, mode, dry_run, on_photo=lambda n: bar.advance(task, n))
    for row in summary.planned:
        typer.echo(f"{row['source']}\t{row['destination'] or '(stays: ' + row['error'] + ')'}")
    table = Table("folder", "photos", title=f"{into}{' (dry run: nothing moved)' if dry_run else ''}")
    for label in [*classifier.classes, "neither", UNREADABLE]:
        table.add_row(f"{label}/" if label != UNREADABLE else "unreadable (left in place)",
                      str(summary.counts.get(label, 0)))
    Console().print(table)
    if summary.finished:
        typer.echo(f"finished {summary.finished} photo(s) an interrupted run had left half-done", err=True)
    if not dry_run:
        typer.echo(f"what went where: {summary.record}", err=True)
    if summary.counts.get(UNREADABLE):
        raise fail(f"{summary.counts[UNREADABLE]} photo(s) could not be read (listed in {summary.record})", 1)
