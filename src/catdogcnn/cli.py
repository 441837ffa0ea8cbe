"""Command line: a thin layer over the Python API (`catdogcnn --help`)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

import typer

from catdogcnn.cli_common import ModelOption, fail, user_errors
from catdogcnn.cli_data import data_app
from catdogcnn.cli_serve import export_web, serve
from catdogcnn.cli_sort import sort
from catdogcnn.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cats-vs-dogs classifier: train, evaluate, predict, serve.\n\n"
                  "A model (--model) is a bundle folder or a shipped bundle's name: default, seed_cnn, "
                  "resnet_small; $CATDOGCNN_MODEL sets the default. A data folder is the seed's layout "
                  "(training_set/CLASS/, test_set/CLASS/, optionally extra_set/CLASS/) or a folder of class "
                  "folders; class names are the folder names, sorted. Exit codes: 0 done; 1 done, but some "
                  "photos could not be read; 2 nothing done, the command was wrong (one line says why).")
app.add_typer(data_app, name="data")

def _print_version(given: bool) -> None:
    if given:
        from catdogcnn import __version__

        typer.echo(f"catdogcnn {__version__}")
        raise typer.Exit()


@app.callback()
def app_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """The options before the command; `--version` acts in its callback, before any command runs."""


def _settings_file(path: Path | None) -> dict:
    """The training settings in a --config JSON file; none without one."""
    if path is None:
        return {}
    try:
        values = json.loads(path.read_text())
    except ValueError as e:  # not UTF-8, or not JSON
        raise UserError(f"{path}: not a JSON file of settings ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of settings, e.g. {{\"epochs\": 10}}")
    return values


ThresholdOption = Annotated[float | None, typer.Option(help="Decision threshold for the second class "
                                                       "(default: the bundle's; the seed's rule is 0.6).")]
TtaOption = Annotated[bool | None, typer.Option("--tta/--no-tta", help="Average over the photo and its mirror "
                                                "image (default: the bundle's setting).")]
NeitherOption = Annotated[bool, typer.Option("--neither/--no-neither", help="Answer 'neither' when the photo "
                                             "shows none of the classes (bundles with a 'neither' rule).")]


@app.command()
@user_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Photos and/or folders of photos.")],
    model: ModelOption = None,
    threshold: ThresholdOption = None,
    output_format: Annotated[str, typer.Option("--format", help="table, csv or json (JSON lines).")] = "table",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Photos per model call (default: by input "
                                                   "size).")] = None,
    tta: TtaOption = None,
    neither: NeitherOption = True,
    threads: Annotated[int | None, typer.Option(min=1, help="onnxruntime threads (default: all cores).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results to FILE (.csv, .jsonl "
                                                "or .parquet, a folder of parts) as they come; a rerun skips "
                                                "the photos already there.")] = None,
    flush_every: Annotated[int, typer.Option(min=1, help="With --output: rows per write (what a kill can "
                                             "lose).")] = 1000,
    ray_address: Annotated[str | None, typer.Option("--ray", help="With --output: label on a Ray cluster: "
                                                    "'local' (the machine it runs on), 'auto' (the cluster "
                                                    "that machine is in) or an address, e.g. ray://HOST:10001."
                                                    )] = None,
    ray_actors: Annotated[int | None, typer.Option(min=1, help="With --ray: model copies (default: one per "
                                                   "CPU of the cluster).")] = None,
) -> None:
    """Label photos: one line per photo; a bad photo, or a folder with no files, prints its error on its own
    line (exit code 1). With --output, the results go to a file that a rerun resumes."""
    from rich.console import Console
    from rich.progress import Progress

    from catdogcnn.predict import expand_photos, load_classifier
    from catdogcnn.results import csv_header, encode_rows, result_columns, result_row

    if output_format not in ("table", "csv", "json"):
        raise fail(f"--format must be table, csv or json, not {output_format!r}")

    classifier = load_classifier(model, threshold=threshold, tta=tta, neither=neither, threads=threads)
    photos, empty_folders, failed = [], 0, 0
    for path in paths:
        found = expand_photos([path])
        if path.is_dir() and not found:  # most likely a wrong path: say so rather than print nothing
            typer.echo(f"error: {path}: no files in this folder", err=True)
            empty_folders += 1
        photos += found
    if output is not None:
        raise typer.Exit(_label_to_file(classifier, photos, output, batch_size, flush_every, ray_address, ray_actors,
                                        empty_folders))
    if ray_address:
        raise fail("--ray needs --output FILE")
    columns = result_columns(classifier.classes, bool(classifier.neither_rules))
    kind = {"csv": "csv", "json": "jsonl"}.get(output_format)
    if kind == "csv":
        typer.echo(csv_header(columns), nl=False)
    # A progress bar on stderr for long runs, only when it is a terminal (quiet in logs and pipes).
    console = Console(stderr=True)
    show_bar = console.is_terminal and len(photos) > classifier.batch_size
    with Progress(console=console, disable=not show_bar, transient=True) as progress:
        task = progress.add_task("classifying", total=len(photos))
        for p in classifier.predict_many(photos, batch_size):
            progress.advance(task)
            failed += not p.ok
            if kind:  # the rows a results file holds, the same fields and numbers
                typer.echo(encode_rows([result_row(p, classifier.classes, "p_neither" in columns)], columns, kind),
                           nl=False)
            elif p.ok:
                typer.echo(f"{p.source}\t{p.label}\t{p.confidence:.4f}" + (f"\t{p.reason}" if p.reason else ""))
            else:
                typer.echo(f"error: {p.error}", err=True)
    problems = ([f"{failed} photo(s) could not be read"] if failed else []) + (
        [f"{empty_folders} folder(s) had no files"] if empty_folders else [])
    if problems:
        typer.echo("; ".join(problems), err=True)
        raise typer.Exit(1)


app.command("sort")(sort)


def _label_to_file(classifier, photos: list[Path], output: Path, batch_size: int | None, flush_every: int,
                   ray_address: str | None, ray_actors: int | None, empty_folders: int) -> int:
    """`predict --output`: label into a resumable results file, here or on Ray; the exit code."""
    from rich.console import Console
    from rich.progress import Progress

    from catdogcnn.results import label_to_file

    console = Console(stderr=True)
    with Progress(console=console, disable=not console.is_terminal, transient=True) as progress:
        advance = functools.partial(progress.advance, progress.add_task("classifying", total=None))
        if ray_address:
            from catdogcnn.ray_predict import label_with_ray

            summary = label_with_ray(classifier, photos, output, ray_address, ray_actors, batch_size, flush_every,
                                     advance)
        else:
            summary = label_to_file(classifier, photos, output, batch_size, flush_every, advance)
    typer.echo(f"{output}: {summary.labelled} photo(s) labelled ({summary.errors} could not be read, recorded with "
               f"their error), {summary.already_done} already there", err=True)
    return 1 if summary.errors or empty_folders else 0


@app.command()
@user_errors
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="Labelled folder: class sub-folders, or the seed layout "
                                             "(then test_set is used).")],
    model: ModelOption = None,
    threshold: ThresholdOption = None,
    tta: TtaOption = None,
    neither: NeitherOption = True,
    non_pets: Annotated[Path | None, typer.Option(help="A folder of photos that show none of the "
                                                  "classes: reports how many are answered 'neither'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    report: Annotated[Path | None, typer.Option(help="Also write an HTML report with plots into this folder.")]
    = None,
) -> None:
    """Accuracy, precision/recall/F1, confusion matrix, ROC AUC and log loss of a model on a folder."""
    from catdogcnn.evaluate import describe_neither_rules
    from catdogcnn.evaluate import evaluate as run_evaluation
    from catdogcnn.predict import load_classifier

    classifier = load_classifier(model, threshold=threshold, tta=tta, neither=neither)
    result = run_evaluation(data_dir, classifier, non_pets=non_pets, details=report is not None)
    if report is not None:
        from catdogcnn.report import evaluation_report

        typer.echo(f"report written to {evaluation_report(result, classifier, report)}", err=True)
        result.pop("photos")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{result['data']}: {result['n']} photos, model {result['model_id']}, "
                  f"threshold {result['threshold']}")
    roc = f"{result['roc_auc']:.4f}" if result["roc_auc"] is not None else "n/a"
    console.print(f"accuracy {result['accuracy']:.4f}   log loss {result['log_loss']:.4f}   ROC AUC {roc}   "
                  f"ECE {result['ece']:.4f}   bad files {len(result['bad_files'])}")
    table = Table("class", "precision", "recall", "F1", "support")
    for name, m in result["per_class"].items():
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    if result["neither"] is not None:
        neither = result["neither"]
        line = f"'neither' ({describe_neither_rules(neither['rules'])}): {neither['pets_flagged']:.2%} of these photos"
        if neither.get("non_pets_flagged") is not None:
            line += f", {neither['non_pets_flagged']:.2%} of {neither['non_pets_n']} photos of none of the classes"
        console.print(line)
    console.print(table)
    matrix = Table("true \\ predicted", *result["classes"], title="confusion matrix")
    for name, row in zip(result["classes"], result["confusion_matrix"], strict=True):
        matrix.add_row(name, *map(str, row))
    console.print(matrix)
    for bad in result["bad_files"]:
        console.print(f"skipped {bad['reason']}", style="yellow")


def with_training_settings(command):
    """`command`, whose `settings` parameter takes the training settings given, as a Typer command with one
    option per `TrainConfig` field there: its help, choices, range and default come from the field."""
    from rich.markup import escape

    from catdogcnn.train.config import TrainConfig, setting_types

    def option(name: str, default, metadata) -> inspect.Parameter:
        notes = [str(metadata["bounds"])] if metadata["bounds"] else []
        notes += [f"default: {default}"] if default is not None else []
        help_line = metadata["help"] + (" " + escape(f"[{'; '.join(notes)}]") if notes else "")
        option_type = Annotated[setting_types()[name] | None, typer.Option(help=help_line, show_default=False)]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option_type)

    settings = fields(TrainConfig)
    signature = inspect.signature(command, eval_str=True)
    parameters = []
    for p in signature.parameters.values():
        parameters += ([option(f.name, f.default, f.metadata) for f in settings] if p.name == "settings"
                       else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)])

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {f.name: kwargs.pop(f.name) for f in settings}
        return command(**kwargs, settings={name: v for name, v in given.items() if v is not None})

    wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper


@app.command()
@user_errors
@with_training_settings
def train(
    data_dir: Annotated[Path, typer.Argument(help="Seed layout (training_set/...) or a folder of class folders.")],
    out: Annotated[Path | None, typer.Option(help="Run folder: checkpoints, metrics.jsonl, bundle/ (default: "
                                             "runs/MODEL).")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="JSON file of TrainConfig settings "
                                                     "(flags given here override it).")] = None,
    settings: dict | None = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from OUT/last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start afresh in an OUT that holds a run already; its files are "
                                            "replaced as the new run writes them.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Train in this many processes on the machine it runs on (torchrun "
                                              "+ DistributedDataParallel; the effective batch is batch size x "
                                              "nproc).")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines training together: start the same command on "
                                               "each, with the same --rdzv-endpoint.")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the first machine, where the machines "
                                                      "meet (with --nnodes).")] = None,
    join_timeout: Annotated[int, typer.Option(min=1, help="Seconds to wait for every machine to join (with "
                                                     "--nnodes).")] = 600,
    bundle: Annotated[Path | None, typer.Option(help="Where to write the model bundle (default OUT/bundle); "
                                                "replaced atomically.")] = None,
) -> None:
    """Train a model; checkpoints every epoch and writes the model bundle to OUT/bundle."""
    from catdogcnn.train import TrainConfig, TrainingInterrupted, keep_freed_memory
    from catdogcnn.train import train as run_training

    config = TrainConfig.from_dict({**_settings_file(config_file), **(settings or {})})
    out = out or Path("runs") / config.model  # one folder per model: training another never meets this run
    _check_run_folder(out, resume, overwrite)
    if config.recipe == "probe":
        from catdogcnn.train.probe import check_probe_request

        check_probe_request(config, [flag for flag, given in (("--resume", resume), ("--nproc", nproc > 1),
                                                              ("--nnodes", nnodes > 1)) if given])
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError("--nnodes needs --rdzv-endpoint HOST:PORT, the first machine's address, on every machine")
    if (nproc > 1 or nnodes > 1) and "WORLD_SIZE" not in os.environ:
        from catdogcnn.train.distributed import launch

        raise typer.Exit(launch(sys.argv[1:], nproc, nnodes, rdzv_endpoint, join_timeout))
    keep_freed_memory()  # this process is the command's own: its allocator may be tuned for training
    try:
        run_training(data_dir, out, config, resume=resume, bundle_dir=bundle)
    except TrainingInterrupted as e:
        raise fail(str(e), code=130) from None


def _check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds a run unless told whether to go on from it or start again."""
    if resume and overwrite:
        raise UserError("--resume goes on from the run in OUT, --overwrite starts it again: give one of them")
    from catdogcnn.train.checkpoint import RUN_FILES

    if not (resume or overwrite) and any((out / name).exists() for name in RUN_FILES):
        raise UserError(f"{out}: holds a run already; --resume to go on, --overwrite to start again")


@app.command()
@user_errors
def quantize(
    bundle: Annotated[Path, typer.Argument(help="Float model bundle to quantize.")],
    data_dir: Annotated[Path, typer.Argument(help="The training data: activation ranges come from training photos, "
                                             "the check from the bundle's own validation photos.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (replaced atomically).")],
    calibration_photos: Annotated[int, typer.Option(min=1, help="Training photos to measure activation "
                                                    "ranges on.")] = 512,
) -> None:
    """Write an int8 copy of a bundle (faster on CPUs) and report how closely it agrees with the original."""
    from catdogcnn.bundle import read_bundle_metadata
    from catdogcnn.quantize import quantize as run_quantize

    written = run_quantize(bundle, data_dir, out, calibration_photos)
    info = read_bundle_metadata(written)["quantization"]
    typer.echo(f"{written}: labels agree on {info['label_agreement']:.2%} of {info['checked_on']}; validation "
               f"accuracy {info['val_accuracy_float']:.2%} -> {info['val_accuracy_int8']:.2%}")


@app.command()
@user_errors
def tune(
    data_dir: Annotated[Path, typer.Argument(help="Seed layout or a folder of class folders (test_set is never "
                                             "used).")],
    model: Annotated[str, typer.Option(help="Architecture from the registry.")] = "seed_cnn",
    trials: Annotated[int, typer.Option(min=1, help="Finished trials the study should hold; a rerun resumes up "
                                        "to it.")] = 20,
    sampler: Annotated[Literal["tpe", "grid"], typer.Option(help="tpe, or grid (every combination of the grid "
                                                           "values).")] = "tpe",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL shared by workers, e.g. "
                                                "postgresql://host/db (default: sqlite in OUT).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default MODEL-SAMPLER).")] = None,
    params: Annotated[str | None, typer.Option(help="Comma-separated settings to search (default all): "
                                               "lr, weight_decay, batch_size, dropout, augment, schedule, "
                                               "image_size, epochs.")] = None,
    grid: Annotated[str | None, typer.Option(help="Grid sampler: the values to try instead of the search "
                                             "space's, e.g. 'augment=seed,crop,strong;epochs=25,50'.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="JSON file of the base TrainConfig "
                                                     "settings that the search does not change.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the study, trial logs and best_config.json "
                                             "(default runs/tune-MODEL).")] = None,
    prune: Annotated[bool, typer.Option(help="Stop trials whose validation accuracy trails the median.")] = True,
    heartbeat: Annotated[int, typer.Option(min=1, help="Seconds between a running trial's heartbeats; a trial "
                                           "silent for four is retried by another worker.")] = 30,
) -> None:
    """Search hyperparameters with Optuna; prints a leaderboard and writes OUT/best_config.json."""
    from rich.console import Console

    from catdogcnn.extras import needs_extra

    with needs_extra("tune"):
        import optuna

        from catdogcnn.train import TrainConfig, TrainingInterrupted, keep_freed_memory
        from catdogcnn.tune import leaderboard, parse_grid
        from catdogcnn.tune import tune as run_tune

    base = TrainConfig.from_dict({**_settings_file(config_file), "model": model})
    out = out or Path(f"runs/tune-{model}")
    console = Console(stderr=True, soft_wrap=True)
    keep_freed_memory()  # as `train` does: the trials train in this process
    try:
        result = run_tune(data_dir, out, base, trials, sampler=sampler, storage=storage, study_name=study,
                          params=params.split(",") if params else None, console=console,
                          pruner=None if prune else optuna.pruners.NopPruner(),
                          grid=parse_grid(grid) if grid else None, heartbeat_s=heartbeat)
    except TrainingInterrupted:
        raise fail(f"interrupted; run the same command again to resume the study in {out}", code=130) from None
    Console(width=None if sys.stdout.isatty() else 200).print(leaderboard(result.study))  # a log keeps every column
    if result.best_config_path:
        typer.echo(f"best configuration: {result.best_config_path}  (catdogcnn train DATA --config "
                   f"{result.best_config_path})")


@app.command("import-keras")
@user_errors
def import_keras_command(
    model_file: Annotated[Path, typer.Argument(help="Keras model: legacy .h5 or Keras 3 .keras.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names, in the order of the model's "
                                                "outputs (default for one sigmoid unit: cats,dogs).")] = None,
) -> None:
    """Convert a Keras Sequential CNN into a model bundle (no TensorFlow needed)."""
    from catdogcnn.keras_import import import_keras

    bundle = import_keras(model_file, out, classes.split(",") if classes else None)
    typer.echo(f"bundle written to {bundle}")


app.command()(serve)
app.command("export-web")(export_web)


@app.command()
@user_errors
def explain(
    photos: Annotated[list[Path], typer.Argument(help="Photos and/or folders of photos.")],
    out: Annotated[Path, typer.Option(help="Folder for the heat maps, one per photo: PHOTO.heatmap.png at the "
                                      "photo's place under the folder that holds them all (a/photo.jpg and "
                                      "b/photo.jpg: a/photo.heatmap.png and b/photo.heatmap.png).")]
    = Path("heatmaps"),
    model: ModelOption = None,
) -> None:
    """Heat maps of where each answer comes from, laid over the photo as the model saw it."""
    from catdogcnn.data import BadImageError
    from catdogcnn.explain import heatmap_paths, save_heatmap
    from catdogcnn.predict import expand_photos, load_classifier

    classifier = load_classifier(model)
    failed = 0
    found = expand_photos(photos)
    for photo, path in zip(found, heatmap_paths(found, out), strict=True):
        try:
            prediction = save_heatmap(classifier, photo, path)
        except BadImageError as e:
            failed += 1
            typer.echo(f"error: {e}", err=True)
            continue
        typer.echo(f"{photo}\t{prediction.label}\t{prediction.confidence:.4f}\t{path}")
    if failed:
        raise typer.Exit(1)


@app.command("report")
@user_errors
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder (with metrics.jsonl).")],
) -> None:
    """Plot a training run's loss and accuracy per epoch (RUN_DIR/report.html, RUN_DIR/curves.png)."""
    from catdogcnn.report import training_report

    typer.echo(f"report written to {training_report(run_dir)}")
