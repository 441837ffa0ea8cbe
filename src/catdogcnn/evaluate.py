"""Metrics of a bundle on a labelled folder (class sub-folders, or the seed layout's `test_set`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catdogcnn.calibration import expected_calibration_error, log_loss, one_vs_rest
from catdogcnn.data import evaluation_folder, scan_folder
from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra
from catdogcnn.predict import NEITHER, Classifier


def describe_neither_rules(rules: list[dict]) -> str:
    """The "neither" rules (kind and cut, as in `evaluate`'s result) in words, for people."""
    words = {"blank": "a blank photo, every colour's standard deviation at most {:.3g} of 255,",
             "learned": "the model's 'neither' score above {:.3g}",
             "imagenet": "ImageNet's probability of the classes below {:.3g}",
             "calibrated": "the probability of 'neither' (the model's evidence) above {:.3g}"}
    return " or ".join(words[rule["kind"]].format(rule["cut"]) for rule in rules)


def evaluate(data_dir: str | Path, classifier: Classifier, batch_size: int | None = None,
             non_pets: str | Path | None = None, details: bool = False) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion matrix, ROC AUC, log loss and the bad files.

    Class folders are matched to the bundle's classes by name; a folder the bundle does not know is an error.
    The class metrics use the class decision alone; "neither" (none of the classes) is a separate decision:
    its rules (kind and cut), the share of these photos it flags and, with `non_pets` (a folder of photos that
    show none of the classes), the share of those it flags.
    `details` adds `photos`: path, true class, probabilities and answer of every photo (for reports).
    """
    with needs_extra("report"):
        from sklearn import metrics

    folder = evaluation_folder(Path(data_dir))
    classes, samples = scan_folder(folder)
    unknown = set(classes) - set(classifier.classes)
    if unknown:
        raise UserError(f"{folder}: classes {sorted(unknown)} are not among the model's {classifier.classes}")
    to_model = {i: classifier.classes.index(c) for i, c in enumerate(classes)}
    truth, probabilities, predicted, bad, flagged, photos = [], [], [], [], 0, []
    for sample, prediction in zip(samples, classifier.predict_many([s.path for s in samples], batch_size),
                                  strict=True):
        if not prediction.ok:
            bad.append({"path": prediction.source, "reason": prediction.error})
            continue
        truth.append(to_model[sample.label])
        probabilities.append([prediction.probabilities[c] for c in classifier.classes])
        predicted.append(classifier.classes.index(classifier.label(np.array(probabilities[-1]))[0]))
        flagged += prediction.label == NEITHER
        photos.append({"path": prediction.source, "true": classifier.classes[truth[-1]],
                       "predicted": classifier.classes[predicted[-1]], "label": prediction.label,
                       "probabilities": prediction.probabilities})
    if not truth:
        raise UserError(f"{folder}: no usable photos to evaluate ({len(bad)} bad files)")
    y, p, yhat = np.array(truth), np.array(probabilities, dtype=np.float64), np.array(predicted)
    p /= p.sum(axis=1, keepdims=True)  # float32 softmax sums are off by ~1e-7, which scikit-learn warns about
    labels = list(range(len(classifier.classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, yhat, labels=labels, zero_division=0)
    result = {
        "data": str(folder),
        "model_id": classifier.model_id,
        "classes": classifier.classes,
        "threshold": classifier.threshold,
        "n": int(len(y)),
        "accuracy": float(metrics.accuracy_score(y, yhat)),
        "log_loss": log_loss(y, p),
        "ece": expected_calibration_error(y, p),
        "confusion_matrix": metrics.confusion_matrix(y, yhat, labels=labels).tolist(),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classifier.classes)},
        "bad_files": bad,
        "neither": None,
    }
    if classifier.neither_rules:
        result["neither"] = {"rules": classifier.neither_cuts, "pets_flagged": flagged / len(y)}
        if non_pets:
            answers = [p for p in classifier.predict_many([non_pets], batch_size) if p.ok]
            result["neither"]["non_pets_n"] = len(answers)
            result["neither"]["non_pets_flagged"] = (sum(p.label == NEITHER for p in answers) / len(answers)
                                                     if answers else None)
    present = sorted(set(y.tolist()))
    if len(present) == len(labels):
        # One class against the rest, averaged over classes (two classes: the second's curve alone)
        aucs = [metrics.roc_auc_score(truth, score) for _, truth, score in one_vs_rest(y, p)]
        result["roc_auc"] = float(np.mean(aucs))
    else:
        result["roc_auc"] = None  # undefined when the folder lacks a class
    if details:
        result["photos"] = photos
    return result
