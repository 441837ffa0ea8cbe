"""Results files for large collections: written as the labelling goes, resumed by a rerun.

    catdogcnn predict photos/ --output labels.csv      # or .jsonl, or .parquet
    label_to_file(load_classifier(), ["photos/"], "labels.csv")

One row per photo: path, label, confidence, p_<class> for every class, p_neither (models that answer "neither"),
error, reason. Rows are written in
batches (`flush_every`), each batch whole and fsynced before the next starts, so a crash or kill loses at most
the batch in hand. A rerun with the same output reads the paths already there and labels only the others: in
the end every photo is in the file exactly once.

- `.csv` and `.jsonl`: one file, whole lines appended. A kill in the middle of a write can leave a partial last
  line; the rerun cuts it off before appending.
- `.parquet`: a folder of part files (`part-00000.parquet`, ...), one per batch, each written under a hidden
  temporary name and renamed into place, so a part is complete or absent. pyarrow, pandas, Spark, DuckDB and
  Polars read the folder as one table.

A photo that cannot be read is recorded with its `error` (and no label) and is not retried by a rerun: a bad
file stays bad. To try such photos again, remove their rows (or the part files that hold them).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from catdogcnn.errors import UserError
from catdogcnn.predict import Classifier, Prediction, expand_photos

FORMATS = (".csv", ".jsonl", ".parquet")
FLUSH_EVERY = 1000  # rows per write: at most this much work is lost to a kill


def result_columns(classes: Sequence[str], neither: bool = False) -> list[str]:
    """The columns of a results file: `p_neither` (the probability of none of the classes) for a model with
    "neither" rules."""
    return ["path", "label", "confidence", *(f"p_{c}" for c in classes), *(["p_neither"] if neither else []),
            "error", "reason"]


def result_schema(columns: Sequence[str]):
    """The columns as a pyarrow schema: probabilities and confidence as floats, the rest as strings."""
    import pyarrow as pa

    return pa.schema([(c, pa.float64() if c == "confidence" or c.startswith("p_") else pa.string())
                      for c in columns])


def result_row(prediction: Prediction, classes: Sequence[str], neither: bool = False) -> dict:
    """A prediction as a row of `result_columns(classes, neither)`."""
    p = prediction
    return {"path": p.source, "label": p.label, "confidence": p.confidence,
            **{f"p_{c}": p.probabilities.get(c) for c in classes},
            **({"p_neither": p.neither_probability} if neither else {}), "error": p.error, "reason": p.reason}


def encode_rows(rows: Iterable[dict], columns: Sequence[str], kind: str) -> str:
    """Rows of `columns` as text: CSV lines ("csv", an empty field for None) or JSON lines ("jsonl"). The one way a
    prediction is written, to a results file and by `predict --format csv|json` alike."""
    if kind == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(["" if row[c] is None else row[c] for c in columns]
                                                       for row in rows)
        return out.getvalue()
    return "".join(json.dumps({c: row[c] for c in columns}) + "\n" for row in rows)


def csv_header(columns: Sequence[str]) -> str:
    return encode_rows([dict(zip(columns, columns, strict=True))], columns, "csv")


class ResultsFile:
    """An append-only results file; `done` holds the paths already in it (read when opened)."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        self.path, self.columns = Path(path), list(columns)
        if self.path.suffix not in FORMATS:
            raise UserError(f"{self.path}: the output must end in {', '.join(FORMATS)}")
        self.done: set[str] = set()

    def append(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_columns(self, found: Sequence[str], where: str) -> None:
        if list(found) != self.columns:
            raise UserError(f"{where}: its columns ({', '.join(found)}) are not this model's "
                            f"({', '.join(self.columns)}); choose another --output")


class LineResults(ResultsFile):
    """.csv or .jsonl: whole lines appended, flushed and fsynced per batch; a partial last line is cut off."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        super().__init__(path, columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+b")  # noqa: SIM115 - held open across batches, closed by close()
        try:
            self.file.seek(0)
            data = self.file.read()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) < len(data):  # killed mid-write: drop the partial line
                self.file.truncate(len(whole))
            self.done = set(self._read_paths(whole.decode()))
            if not whole:
                self._write(self._header())
        except BaseException:
            self.file.close()
            raise

    def _header(self) -> str:
        return csv_header(self.columns) if self.path.suffix == ".csv" else ""

    def _read_paths(self, text: str) -> list[str]:
        if not text:
            return []
        if self.path.suffix == ".csv":
            reader = csv.reader(io.StringIO(text))
            self._check_columns(next(reader), str(self.path))
            return [row[0] for row in reader]
        paths = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{self.path}: line {number} is not JSON; choose another --output") from None
            if number == 1:
                self._check_columns(list(record), str(self.path))
            paths.append(record["path"])
        return paths

    def _write(self, text: str) -> None:
        self.file.write(text.encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self._write(encode_rows(rows, self.columns, self.path.suffix.lstrip(".")))
        self.done.update(row["path"] for row in rows)

    def close(self) -> None:
        self.file.close()


class ParquetResults(ResultsFile):
    """.parquet: a folder of part files, one per batch, each renamed into place once complete."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        super().__init__(path, columns)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{self.path}: .parquet results need pyarrow (pip install 'catdogcnn[ray]'), "
                            "or choose .csv or .jsonl") from None
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: a .parquet output is a folder of part files, and this is a file")
        self.path.mkdir(parents=True, exist_ok=True)
        self.schema = result_schema(self.columns)
        for partial in self.path.glob(".part-*.tmp"):  # a part a kill cut short: its rows are written again
            partial.unlink()
        self.parts = sorted(self.path.glob("part-*.parquet"))
        for part in self.parts:
            table = pq.read_table(part)
            self._check_columns(table.column_names, str(part))
            self.done.update(table.column("path").to_pylist())

    def append(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        index = int(self.parts[-1].stem.split("-")[1]) + 1 if self.parts else 0
        part = self.path / f"part-{index:05d}.parquet"
        partial = self.path / f".{part.name}.tmp"  # hidden: readers of the folder skip it
        pq.write_table(pa.Table.from_pylist(rows, self.schema), partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, part)
        self.parts.append(part)
        self.done.update(row["path"] for row in rows)


def open_results(path: str | os.PathLike, classes: Sequence[str], neither: bool = False) -> ResultsFile:
    """The results file at `path` (.csv, .jsonl or .parquet), created or opened to resume."""
    kind = ParquetResults if Path(path).suffix == ".parquet" else LineResults
    return kind(path, result_columns(classes, neither))


@dataclass
class LabelSummary:
    output: Path
    already_done: int  # photos found in the output when the run started
    labelled: int  # photos this run labelled (errors included)
    errors: int  # photos this run could not read


def photos_to_do(photos: Iterable[str | os.PathLike], done: set[str]) -> list[Path]:
    """Files and folders expanded, each photo once, less those already in the output."""
    return [p for p in dict.fromkeys(expand_photos(photos)) if str(p) not in done]


def write_rows(results: ResultsFile, rows: Iterable[dict], flush_every: int = FLUSH_EVERY,
               on_rows: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Append `rows` in batches of `flush_every`; returns (rows written, rows with an error)."""
    written = errors = 0
    rows = iter(rows)
    while batch := list(islice(rows, flush_every)):
        results.append(batch)
        written, errors = written + len(batch), errors + sum(row["error"] is not None for row in batch)
        if on_rows:
            on_rows(len(batch))
    return written, errors


def label_to_file(classifier: Classifier, photos: Iterable[str | os.PathLike], output: str | os.PathLike,
                  batch_size: int | None = None, flush_every: int = FLUSH_EVERY,
                  on_rows: Callable[[int], None] | None = None) -> LabelSummary:
    """Label photos (files and folders) into `output`, skipping those already there (see the module's notes)."""
    neither = bool(classifier.neither_rules)
    with open_results(output, classifier.classes, neither) as results:
        already = len(results.done)
        todo = photos_to_do(photos, results.done)
        rows = (result_row(p, classifier.classes, neither) for p in classifier.predict_many(todo, batch_size))
        labelled, errors = write_rows(results, rows, flush_every, on_rows)
    return LabelSummary(Path(output), already, labelled, errors)
