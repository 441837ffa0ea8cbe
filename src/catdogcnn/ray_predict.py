"""Labelling over a Ray cluster: `catdogcnn predict PHOTOS --output FILE --ray ADDRESS`.

    import ray
    ray.init("ray://head:10001")                      # or nothing: a local Ray on the machine's own cores
    label_with_ray(load_classifier(), ["/shared/photos"], "labels.parquet")

The photo paths go through `ray.data` to a pool of actors, one per CPU by default; each actor loads the bundle
once (its files travel with the job, so only the photos need to be reachable from every node: the same path
on a shared file system) and labels its batches with one onnxruntime thread. The results come back to this
process, which writes them as `results.label_to_file` does: in batches, resumable, every photo once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from catdogcnn.extras import needs_extra
from catdogcnn.predict import Classifier, load_classifier
from catdogcnn.results import (
    FLUSH_EVERY,
    LabelSummary,
    open_results,
    photos_to_do,
    result_columns,
    result_row,
    result_schema,
    write_rows,
)


class BundleLabeller:
    """A Ray Data callable class: one Classifier per actor, built from the shipped bundle files."""

    def __init__(self, files: dict[str, bytes], options: dict):
        self.folder = tempfile.TemporaryDirectory(prefix="catdogcnn-bundle-")
        for name, data in files.items():
            (Path(self.folder.name) / name).write_bytes(data)
        self.classifier = load_classifier(self.folder.name, **options)

    def __call__(self, batch: dict):
        import pyarrow as pa

        predictions = self.classifier.predict_many(list(batch["path"]), workers=1)
        neither = bool(self.classifier.neither_rules)
        rows = [result_row(p, self.classifier.classes, neither) for p in predictions]
        return pa.Table.from_pylist(rows, result_schema(result_columns(self.classifier.classes, neither)))


def label_with_ray(classifier: Classifier, photos: Iterable[str | os.PathLike], output: str | os.PathLike,
                   address: str | None = None, actors: int | None = None, batch_size: int | None = None,
                   flush_every: int = FLUSH_EVERY, on_rows: Callable[[int], None] | None = None) -> LabelSummary:
    """Label photos into `output` on a Ray cluster with copies of `classifier` (its bundle, threshold, mirror
    averaging and "neither" rule): the cluster this process is connected to, else `ray.init(address)`'s
    ("local" starts one here, "auto" finds the one the machine belongs to, "ray://HOST:10001" a remote one). `actors`
    defaults to the cluster's CPUs."""
    with needs_extra("ray"):
        import pyarrow as pa
        import ray

    folder = classifier.bundle if classifier.bundle.is_dir() else classifier.bundle.parent
    files = {name: (folder / name).read_bytes() for name in ("bundle.json", classifier.metadata["graph"]["file"])}
    options = {"threshold": classifier.threshold, "tta": classifier.tta,
               "neither": bool(classifier.neither_rules), "threads": 1}
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    with open_results(output, classifier.classes, bool(classifier.neither_rules)) as results:
        already = len(results.done)
        todo = photos_to_do(photos, results.done)
        if not todo:
            return LabelSummary(Path(output), already, 0, 0)
        paths = pa.table({"path": [str(p) for p in todo]})
        # Blocks of at most 1,000 photos, at least four per actor: a block is one actor's task.
        size = max(1, min(1000, -(-len(todo) // (4 * actors))))
        blocks = [paths.slice(start, size) for start in range(0, len(todo), size)]
        labelled = ray.data.from_arrow(blocks).map_batches(
            BundleLabeller, fn_constructor_kwargs={"files": files, "options": options},
            batch_size=batch_size or classifier.batch_size, batch_format="numpy", concurrency=actors, num_cpus=1)
        rows = (row for batch in labelled.iter_batches(batch_size=None, batch_format="pyarrow")
                for row in batch.to_pylist())
        written, errors = write_rows(results, rows, flush_every, on_rows)
    return LabelSummary(Path(output), already, written, errors)
