"""Reports people can look at: a self-contained HTML page with PNG plots beside it (Matplotlib, Agg; no CDN).

`evaluation_report` takes `evaluate(..., details=True)`; `training_report` plots a run's metrics.jsonl.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from catdogcnn.calibration import decide, one_vs_rest, reliability
from catdogcnn.errors import UserError
from catdogcnn.evaluate import describe_neither_rules
from catdogcnn.extras import needs_extra
from catdogcnn.predict import Classifier

with needs_extra("report"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

SEED_THRESHOLD = 0.6
STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2330}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}img.plot{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.photos{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));gap:.75rem}
.photos figure{margin:0}.photos img{width:100%}figcaption{font-size:.8rem;overflow-wrap:anywhere}"""


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _photo_grid(classifier: Classifier, photos: list[dict], out_dir: Path, prefix: str) -> str:
    """Thumbnails (with heat maps when the model has them) of the given photos, saved beside the report."""
    from catdogcnn.explain import explain

    figures = []
    for i, photo in enumerate(photos):
        name = f"{prefix}_{i}.png"
        if classifier.can_explain:
            _, image = explain(classifier, photo["path"])
        else:
            image = Image.fromarray(classifier.preprocess(photo["path"]))
        image.save(out_dir / name)
        caption = (f"{Path(photo['path']).name}: true {photo['true']}, answered {photo['predicted']} "
                   f"({photo['probabilities'][photo['predicted']]:.1%})")
        figures.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<div class='photos'>" + "".join(figures) + "</div>" if figures else "<p>None.</p>"


def evaluation_report(result: dict, classifier: Classifier, out_dir: str | Path, examples: int = 8) -> Path:
    """Write `out_dir/report.html` and its plots; returns the HTML path."""
    with needs_extra("report"):
        from sklearn import metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = result["classes"]
    photos = result["photos"]
    y = np.array([classes.index(p["true"]) for p in photos])
    p = np.array([[p["probabilities"][c] for c in classes] for p in photos])
    plots = []

    fig, ax = plt.subplots(figsize=(4, 3.6))
    matrix = np.array(result["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="black" if count < matrix.max() / 2 else "white")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="answered", ylabel="true", title="Confusion matrix")
    plots.append(("Confusion matrix", _save(fig, out_dir, "confusion_matrix.png")))

    if len(set(y.tolist())) == len(classes):
        fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
        for k, truth, score in one_vs_rest(y, p):
            fpr, tpr, _ = metrics.roc_curve(truth, score)
            roc_ax.plot(fpr, tpr, label=classes[k])
            precision, recall, _ = metrics.precision_recall_curve(truth, score)
            pr_ax.plot(recall, precision, label=classes[k])
        roc_ax.plot([0, 1], [0, 1], ":", color="grey")
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate",
                   title=f"ROC (AUC {result['roc_auc']:.4f})")
        pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        roc_ax.legend(), pr_ax.legend()
        plots.append(("ROC and precision-recall curves", _save(fig, out_dir, "roc_pr.png")))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    bins = reliability(y, p)  # the bins the ECE above is computed over
    ax.plot([1 / len(classes), 1], [1 / len(classes), 1], ":", color="grey", label="perfect calibration")
    ax.plot(bins.confidence, bins.accuracy, "o-", label="this model")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {result['ece']:.4f})")
    ax.legend()
    plots.append(("Calibration (reliability diagram)", _save(fig, out_dir, "calibration.png")))

    if len(classes) == 2:
        thresholds = np.linspace(0.01, 0.99, 99)
        answers = [decide(p, t) for t in thresholds]
        accuracy = [(a == y).mean() for a in answers]
        first_as_second = [((a == 1) & (y == 0)).sum() / max(1, (y == 0).sum()) for a in answers]
        second_as_first = [((a == 0) & (y == 1)).sum() / max(1, (y == 1).sum()) for a in answers]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(thresholds, accuracy, label="accuracy")
        ax.plot(thresholds, first_as_second, label=f"{classes[0]} called {classes[1]}")
        ax.plot(thresholds, second_as_first, label=f"{classes[1]} called {classes[0]}")
        ax.axvline(result["threshold"], color="black", linestyle="--", label=f"bundle's {result['threshold']:g}")
        ax.axvline(SEED_THRESHOLD, color="grey", linestyle=":", label=f"seed's {SEED_THRESHOLD}")
        ax.set(xlabel=f"threshold on p({classes[1]})", ylabel="rate", title="Across thresholds")
        ax.legend(fontsize=8)
        plots.append(("Accuracy and error rates across thresholds", _save(fig, out_dir, "thresholds.png")))

    rows = [("photos", str(result["n"])), ("accuracy", f"{result['accuracy']:.4f}"),
            ("log loss", f"{result['log_loss']:.4f}"),
            ("ROC AUC", f"{result['roc_auc']:.4f}" if result["roc_auc"] is not None else "n/a"),
            ("expected calibration error", f"{result['ece']:.4f}"), ("threshold", f"{result['threshold']:g}"),
            ("bad files skipped", str(len(result["bad_files"])))]
    rows += [(f"{name}: precision / recall / F1", f"{m['precision']:.4f} / {m['recall']:.4f} / {m['f1']:.4f}")
             for name, m in result["per_class"].items()]
    if result.get("neither"):
        rows.append(("'neither' rules", describe_neither_rules(result["neither"]["rules"])))
        rows.append(("'neither' among these photos", f"{result['neither']['pets_flagged']:.2%}"))
        if result["neither"].get("non_pets_flagged") is not None:
            rows.append(("'neither' among photos of none of the classes",
                         f"{result['neither']['non_pets_flagged']:.2%} of {result['neither']['non_pets_n']}"))
    calibration = classifier.metadata.get("calibration")
    if calibration:
        rows.append(("validation ECE before / after temperature",
                     f"{calibration['ece_before']:.4f} / {calibration['ece_after']:.4f} "
                     f"(T = {calibration['temperature']:.3f})"))

    wrong = [i for i in np.argsort(-p.max(1)) if p[i].argmax() != y[i]][:examples]
    unsure = list(np.argsort(p.max(1)))[:examples]
    body = (f"<p>Model <code>{html.escape(result['model_id'])}</code> on <code>{html.escape(result['data'])}</code>."
            f"</p><h2>Metrics</h2>{_table(rows)}"
            + "".join(f"<h2>{html.escape(title)}</h2><img class='plot' src='{name}' alt='{html.escape(title)}'>"
                      for title, name in plots)
            + "<h2>Most confidently wrong</h2>" + _photo_grid(classifier, [photos[i] for i in wrong], out_dir, "wrong")
            + "<h2>Least confident</h2>" + _photo_grid(classifier, [photos[i] for i in unsure], out_dir, "unsure")
            + "<h2>Bad files skipped</h2>"
            + ("<ul>" + "".join(f"<li>{html.escape(b['reason'])}</li>" for b in result["bad_files"]) + "</ul>"
               if result["bad_files"] else "<p>None.</p>"))
    path = out_dir / "report.html"
    path.write_text(_page("Evaluation report", body))
    (out_dir / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "photos"}, indent=2))
    return path


def training_report(run_dir: str | Path) -> Path:
    """Loss and accuracy per epoch, training and validation, from `run_dir/metrics.jsonl`."""
    run_dir = Path(run_dir)
    log_path = run_dir / "metrics.jsonl"
    if not log_path.exists():
        raise FileNotFoundError(f"{log_path}: no metrics log (is {run_dir} a training run folder?)")
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not log:
        raise UserError(f"{log_path}: empty metrics log (the probe recipe has no epochs to plot)")
    epochs = [r["epoch"] for r in log]
    fig, (loss_ax, acc_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
        ax.plot(epochs, [r[f"train_{key}"] for r in log], "o-", label="training (augmented)")
        ax.plot(epochs, [r[f"val_{key}"] for r in log], "o-", label="validation")
        ax.set(xlabel="epoch", title=key)
        ax.legend()
    minutes = np.cumsum([r["seconds"] for r in log]) / 60
    time_ax.plot(minutes, [r["val_accuracy"] for r in log], "o-", color="C1")
    time_ax.set(xlabel="training minutes (epochs only)", title="validation accuracy against time")
    name = _save(fig, run_dir, "curves.png")
    best = max(log, key=lambda r: r["val_accuracy"])
    rows = [("epochs", str(len(log))), ("best validation accuracy", f"{best['val_accuracy']:.4f} (epoch "
                                                                   f"{best['epoch']})"),
            ("training seconds", f"{sum(r['seconds'] for r in log):.0f}")]
    path = run_dir / "report.html"
    path.write_text(_page(f"Training: {run_dir.name}", _table(rows) + f"<img class='plot' src='{name}' "
                                                                    "alt='loss and accuracy per epoch'>"))
    return path
