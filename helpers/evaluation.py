"""Evaluation that a reviewer would accept: test metrics, calibration, errors and Grad-CAM.

`predict` runs a model over an `ImageDataset` and keeps everything per image (probabilities,
logits, group), so every later number is computed from one table with scikit-learn:
`compute_metrics` (accuracy, balanced accuracy, macro-F1, ROC AUC, per class and per group),
`expected_calibration_error` / `fit_temperature` / `apply_temperature` (is a 0.9 confidence
right 90 % of the time, and the one-parameter fix when it is not), `most_confident_mistakes`,
and Grad-CAM overlays that show where the network looked.

Notebook 05 writes ``metrics.json`` (made by `summarize_run`, written by `helpers.files.write_json`) with:

- ``test_accuracy``, ``test_balanced_accuracy``, ``test_macro_f1``: on the held-out test split;
- ``test_roc_auc``: binary: AUC of the last (positive) class; multi-class: one-vs-rest macro;
  None when the test split lacks a class;
- ``baseline_majority`` (and ``_macro_f1``): test accuracy (macro-F1) of always answering the most
  frequent training class; ``baseline_probe`` (and ``_balanced_accuracy``, ``_macro_f1``): the linear
  probe on the frozen backbone (logistic regression, C by cross-validation on train) on test;
  ``baseline_scratch_val`` and ``pretrained_val_same_budget``: the from-scratch control and the best
  pretrained strategy under notebook 03's budget (on validation, or cross-validated on train + validation
  when that split is small), in ``selection_metric`` (accuracy, or
  macro-F1 for ELPV's four classes; all three None when not run); ``final_model``: "fine-tuned" or "probe";
  ``candidate_strategy``: the strategy notebook 04 trained and the floor judged against the probe (None when
  not recorded), so a run that kept the probe still says what it tried;
- ``per_group``: {group: {accuracy, balanced_accuracy, macro_f1, roc_auc, n}} (ELPV: mono/poly);
- ``per_class``: {class: {precision, recall, f1, support}};
- ``ece``, ``ece_after_temperature``: top-label expected calibration error (15 bins) before and
  after temperature scaling; ``ece_by_chance``: the ECE a perfectly calibrated model with the same
  (uncalibrated) test confidences would show on this many images, on average (`ece_by_chance`);
  ``temperature``: T fitted on the validation split (1 when every validation image is right: nothing to fit);
- ``tta_accuracy``: test accuracy with flip test-time augmentation (None when not run); ``tta``: which
  flips (``"hflip"``, or ``"hvflip"`` for images with no 'up'), None when not run (a recipe without flips);
  ``augment``: the training augmentation recipe the flips follow (None when not given);
- ``backbone``, ``strategy``, ``image_size``, ``epochs``, ``train_seconds``, ``task``,
  ``classes``, ``n_test``: what was trained, how long, on which task.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, accuracy_score,
                             precision_recall_fscore_support, roc_auc_score)
from torch import nn
from torch.utils.data import Dataset

from .metrics import score, score_margin
from .runtime import amp_dtype, autocast, make_loader, pick_device, to_device

TTA_MODES = {None: [], "hflip": [(-1,)], "hvflip": [(-1,), (-2,)]}  # extra views: flips of these dims

METRICS_KEYS = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc", "baseline_majority",
                "baseline_majority_macro_f1", "baseline_probe", "baseline_probe_balanced_accuracy",
                "baseline_probe_macro_f1", "baseline_scratch_val", "pretrained_val_same_budget", "selection_metric",
                "final_model", "candidate_strategy", "per_group", "per_class", "ece", "ece_after_temperature",
                "ece_by_chance", "temperature", "tta_accuracy", "tta", "augment", "backbone", "strategy", "image_size",
                "epochs", "train_seconds", "task", "classes", "n_test")


# ----------------------------------------------------------------------------------------
# Predictions


def _prob_cols(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def _logit_cols(classes: Sequence[str]) -> list[str]:
    return [f"logit_{c}" for c in classes]


def _check_dataset(dataset) -> None:
    if not hasattr(dataset, "frame") or not hasattr(dataset, "classes"):
        raise TypeError(f"expected a helpers.data.ImageDataset (with .frame and .classes), "
                        f"got {type(dataset).__name__}")


@torch.inference_mode()
def _logits(model: nn.Module, dataset, batch_size: int, device: torch.device, tta: str | None,
            num_workers: int | None, amp: bool = False) -> np.ndarray:
    """Logits per image in dataset order; with ``tta`` the log of the flip-averaged softmax."""
    dtype = amp_dtype(device) if amp else None
    out = []
    for x, _ in make_loader(dataset, batch_size, False, device, num_workers=num_workers):
        x = to_device(x, device)
        views = [x] + [x.flip(dims) for dims in TTA_MODES[tta]]
        with autocast(device, dtype):
            logits = [model(v).float() for v in views]
        if tta:
            # Average probabilities, not logits; store their log so softmax(logit_) == prob_ still holds.
            mean_prob = torch.stack([z.softmax(1) for z in logits]).mean(0)
            out.append(mean_prob.clamp_min(1e-12).log().cpu())
        else:
            out.append(logits[0].cpu())
    return torch.cat(out).double().numpy()


def _table(logits: np.ndarray, frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    probs = torch.from_numpy(logits).softmax(1).numpy()
    predicted = probs.argmax(1)
    table = pd.DataFrame({
        "file": frame["file"].to_numpy(),
        "group": frame["group"].to_numpy() if "group" in frame else None,
        "true": frame["label"].to_numpy(),
        "pred": [classes[i] for i in predicted],
        "target": frame["target"].to_numpy().astype(int),
        "predicted": predicted.astype(int),
    })
    for j, col in enumerate(_prob_cols(classes)):
        table[col] = probs[:, j]
    table["confidence"] = probs.max(1)
    for j, col in enumerate(_logit_cols(classes)):
        table[col] = logits[:, j]
    return table


def predict(model: nn.Module, dataset: Dataset, batch_size: int = 64, device: str | torch.device | None = None,
            tta: str | None = None, num_workers: int | None = None, amp: bool = False) -> pd.DataFrame:
    """One row per image of ``dataset`` (an `ImageDataset`), in dataset order.

    Columns: file, group, true, pred (class names), target, predicted (indices),
    ``prob_<class>``, confidence (the top probability), ``logit_<class>``. ``tta`` averages the
    softmax over flipped copies too: ``"hflip"`` the mirror image (photos: a mirrored cat is a
    cat), ``"hvflip"`` also the upside-down one (only for images with no 'up', such as solar
    cells; `helpers.transforms.TTA_FLIPS` maps an augmentation recipe to its mode). ``logit_``
    then holds the log of the averaged probabilities. The row index is the image's position.

    The forward pass runs in fp32, as the export and `helpers.predict` run the model, so the scores describe the
    model that ships: on a GPU, bf16 features through a probe's folded weights (large where a feature barely
    varies) flip some answers. ``amp=True`` runs it in the device's mixed precision instead, faster.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; choose one of {list(TTA_MODES)}")
    _check_dataset(dataset)
    classes = list(dataset.classes)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"the model has {num_classes} outputs but the dataset has {len(classes)} "
                         f"classes {classes}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    device = pick_device(device)
    model.eval().to(device)
    logits = _logits(model, dataset, batch_size, device, tta, num_workers, amp)
    return _table(logits, dataset.frame, classes)


def save_predictions(pred: pd.DataFrame, path: str | Path, calibrated: pd.DataFrame | None = None,
                     subjects: Sequence[str] | None = None) -> Path:
    """Write `predict`'s table as CSV for your own error analysis: per image, its file, group, subject (given
    ``subjects``, in ``pred``'s order), true and predicted class, whether that is right, the top probability
    (and after temperature scaling, given ``calibrated``), and one probability per class, uncalibrated. Cells a
    spreadsheet would run as formulas are escaped."""
    from .files import write_csv
    from .predict import escape_formulas

    table = pred[["file", "group", "true", "pred"]].copy()
    if table["group"].isna().all():
        table = table.drop(columns="group")
    if subjects is not None:
        if len(subjects) != len(table):
            raise ValueError(f"{len(subjects)} subjects for {len(table)} predictions")
        table.insert(1, "subject", np.asarray(subjects))
    table["correct"] = (pred["target"] == pred["predicted"]).to_numpy()
    table["confidence"] = pred["confidence"].to_numpy()
    if calibrated is not None:
        if not (calibrated["file"].to_numpy() == pred["file"].to_numpy()).all():
            raise ValueError("calibrated predictions are for other images than pred (or in another order)")
        table["calibrated_confidence"] = calibrated["confidence"].to_numpy()
    for column in (c for c in pred.columns if c.startswith("prob_")):
        table[column] = pred[column].to_numpy()
    return write_csv(escape_formulas(table, ("file", "true", "pred") + (("subject",) if subjects is not None else ())),
                     path)


# ----------------------------------------------------------------------------------------
# Metrics


def _check_pred(pred: pd.DataFrame, classes: Sequence[str], need_logits: bool = False) -> None:
    cols = ["target", "predicted", *_prob_cols(classes)] + (_logit_cols(classes) if need_logits else [])
    missing = [c for c in cols if c not in pred.columns]
    if missing:
        raise KeyError(f"prediction table lacks column(s) {missing} for classes {list(classes)}; "
                       f"its columns are {list(pred.columns)} (make it with helpers.evaluation.predict)")
    if len(pred) == 0:
        raise ValueError("the prediction table is empty")


def _roc_auc(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[float | None, str | None]:
    """ROC AUC, or None and the reason when a class is missing (AUC needs every class)."""
    absent = [c for i, c in enumerate(classes) if not (targets == i).any()]
    if absent:
        return None, f"ROC AUC undefined: no image of class(es) {absent}"
    if len(classes) == 2:
        return float(roc_auc_score(targets == 1, probs[:, 1])), None
    return float(roc_auc_score(targets, probs, multi_class="ovr", average="macro",
                               labels=list(range(len(classes))))), None


def _scores(targets: np.ndarray, predicted: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected in small groups, the score is still defined.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # The same definitions that select the best epoch during training.
        result = {metric: score(metric, targets, predicted) for metric in ("accuracy", "balanced_accuracy",
                                                                           "macro_f1")}
    result["roc_auc"], note = _roc_auc(targets, probs, classes)
    if note:
        result["roc_auc_note"] = note
    result["n"] = int(len(targets))
    return result


def compute_metrics(pred: pd.DataFrame, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, ROC AUC, per class and per group, from scikit-learn.

    ROC AUC is for the positive (last) class in a binary task and one-vs-rest macro
    otherwise; it is None, with a ``roc_auc_note`` saying why, where a split or group lacks a
    class. All values are plain Python numbers, ready for JSON.
    """
    classes = list(classes)
    _check_pred(pred, classes)
    targets = pred["target"].to_numpy().astype(int)
    predicted = pred["predicted"].to_numpy().astype(int)
    probs = pred[_prob_cols(classes)].to_numpy(dtype=float)
    bad = sorted(set(np.unique(targets)) - set(range(len(classes))))
    if bad:
        raise ValueError(f"target indices {bad} are outside the {len(classes)} classes {classes}")

    metrics = _scores(targets, predicted, probs, classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=list(range(len(classes))), zero_division=0)
    metrics["per_class"] = {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                                "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)}
    metrics["per_group"] = {}
    if "group" in pred.columns and pred["group"].notna().any():
        groups = pred["group"].astype(str).to_numpy()
        for group in sorted(set(groups[pred["group"].notna().to_numpy()])):
            mask = groups == group
            metrics["per_group"][group] = _scores(targets[mask], predicted[mask], probs[mask], classes)
    return metrics


# ----------------------------------------------------------------------------------------
# Calibration


def per_subject(pred: pd.DataFrame, subjects: Sequence[str]) -> pd.DataFrame:
    """One row per subject (``subjects``: each test image's, in ``pred``'s order): its images, how many are
    right, its accuracy, ``chance`` (two standard errors of an accuracy on that many images at the overall
    accuracy: how far luck alone moves a subject), ``beyond_chance`` (its accuracy further from the overall one
    than that) and the classes it holds; worst first (lowest accuracy, then most images). A model that fails on
    whole subjects (one patient's scans, one writer's digits) shows here, not in the per-class table."""
    subjects = np.asarray(subjects).astype(str)
    if len(subjects) != len(pred):
        raise ValueError(f"subjects has {len(subjects)} entries for {len(pred)} predictions")
    frame = pd.DataFrame({"subject": subjects, "correct": (pred["target"] == pred["predicted"]).to_numpy(),
                          "true": pred["true"].to_numpy()})
    table = frame.groupby("subject").agg(images=("correct", "size"), right=("correct", "sum"),
                                         classes=("true", lambda s: ", ".join(sorted(set(map(str, s))))))
    table["accuracy"] = table["right"] / table["images"]
    overall = float(frame["correct"].mean())
    table["chance"] = 2 * np.sqrt(overall * (1 - overall) / table["images"])
    table["beyond_chance"] = (table["accuracy"] - overall).abs() > table["chance"]
    table = table[["images", "right", "accuracy", "chance", "beyond_chance", "classes"]]
    return table.sort_values(["accuracy", "images"], ascending=[True, False], kind="stable").reset_index()


def _check_probs(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets).astype(int)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(f"probs must be (N, classes) with N = len(targets) = {len(targets)}, "
                         f"got shape {probs.shape}")
    if len(targets) == 0:
        raise ValueError("no predictions given")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must be class indices in 0..{probs.shape[1] - 1}, "
                         f"got values {sorted(set(targets.tolist()))[:10]}")
    return probs, targets


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: bin images by their top probability into ``n_bins`` equal-width bins and
    average |accuracy - mean confidence| over the bins, weighted by bin size (Guo et al. 2017)."""
    probs, targets = _check_probs(probs, targets)
    return _binned_gap(probs.max(1), probs.argmax(1) == targets, n_bins)


def _binned_gap(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    # Bins (lo, hi]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def ece_by_chance(probs: np.ndarray, rounds: int = 200, seed: int = 0, n_bins: int = 15,
                  quantile: float | None = None) -> float:
    """The ECE that a perfectly calibrated model with these confidences would show on this many images, from
    chance alone: each image is right with probability equal to its confidence; the mean over ``rounds`` draws,
    or their ``quantile`` (0.95: an ECE above it is unlikely from chance alone). ECE is biased upward on small
    splits (a bin's gap counts whichever way it goes), so an ECE near the mean is no evidence of
    miscalibration; with confidences of exactly 1 it is 0. The draws treat images as independent: images of one
    subject that err together make the real figure larger."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty (images, classes) array, got shape {probs.shape}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    confidence = probs.max(1)
    rng = np.random.default_rng(seed)
    draws = [_binned_gap(confidence, rng.random(len(confidence)) < confidence, n_bins) for _ in range(rounds)]
    return float(np.mean(draws) if quantile is None else np.quantile(draws, quantile))


def ece_difference_se(probs_a: np.ndarray, probs_b: np.ndarray, targets: np.ndarray, rounds: int = 500,
                      seed: int = 0, n_bins: int = 15, groups: Sequence | None = None) -> float:
    """Standard error of ``ECE(a) - ECE(b)`` for two sets of probabilities for the same images (e.g. before and
    after temperature scaling): a paired bootstrap over the images. ECE is not a per-image mean, so no formula;
    on a few dozen images the difference moves by hundredths from resampling alone. With ``groups`` (each image's
    subject), over whole subjects, never below the per-image error, and infinite with one subject."""
    probs_a, targets = _check_probs(probs_a, targets)
    probs_b, _ = _check_probs(probs_b, targets)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {probs_a.shape} and {probs_b.shape}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        names, group_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        if len(group_of) != len(targets):
            raise ValueError(f"groups has {len(group_of)} entries for {len(targets)} images")
        if len(names) < 2:
            return math.inf
        members = [np.flatnonzero(group_of == g) for g in range(len(names))]
        per_image = ece_difference_se(probs_a, probs_b, targets, rounds, seed, n_bins)
    diffs = []
    for _ in range(rounds):
        i = (rng.integers(0, len(targets), len(targets)) if groups is None
             else np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))]))
        diffs.append(expected_calibration_error(probs_a[i], targets[i], n_bins)
                     - expected_calibration_error(probs_b[i], targets[i], n_bins))
    return float(np.std(diffs, ddof=1)) if groups is None else max(float(np.std(diffs, ddof=1)), per_image)


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(nn.functional.cross_entropy(logits / temperature, targets))


TEMPERATURE_RANGE = (0.05, 20.0)  # where `fit_temperature` searches; an answer at either end is not a real optimum


class TemperatureLimitWarning(UserWarning):
    """The fitted temperature is at an end of `TEMPERATURE_RANGE` (notebook 05 says so in its prose)."""


def temperature_at_limit(temperature: float) -> bool:
    """True when ``temperature`` sits at an end of `TEMPERATURE_RANGE`: the validation loss was still falling
    there, usually because the validation split is tiny or its mistakes are unlike the test split's."""
    return any(abs(math.log(temperature / end)) < 1e-3 for end in TEMPERATURE_RANGE)


def fit_temperature(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """The temperature T > 0 that minimizes the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Fit it on the validation split, never on the test split it is then judged on. One
    parameter cannot change which class wins, only how sure the model claims to be. A
    `TemperatureLimitWarning` says when the answer is an end of the range searched.
    """
    from scipy.optimize import minimize_scalar

    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    _check_probs(logits.numpy(), targets.numpy())
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity")
    # The NLL is smooth and unimodal in log T; a bounded 1-D search needs no tuning.
    lo, hi = (math.log(end) for end in TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: _nll(logits, targets, math.exp(log_t)), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-6})
    if not result.success:
        raise RuntimeError(f"temperature fit did not converge: {result.message}")
    temperature = float(math.exp(result.x))
    if temperature_at_limit(temperature):
        warnings.warn(f"fitted temperature {temperature:.3g} is at the search limit {list(TEMPERATURE_RANGE)}: "
                      f"the logits are far from calibrated or the split is tiny", TemperatureLimitWarning,
                      stacklevel=2)
    return temperature


def temperature_holds_up(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, folds: int = 10,
                         seed: int = 0, groups: Sequence | None = None) -> dict:
    """Does a fitted temperature help on images it was not fitted on? Cross-validated over ``folds`` folds of
    the validation images (one image per fold when there are fewer; with ``groups``, each image's subject or
    picture with its copies, `helpers.data.units_of`, whole groups per fold): a T fitted on the other folds, then
    the NLL on each fold with that T (``nll_fitted``) and with T = 1 (``nll_plain``), averaged over the images. On
    a handful of images one T can fit their quirks and make the test split worse; ``holds_up`` is True only when
    the held-out loss fell."""
    from sklearn.model_selection import GroupKFold, KFold

    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    units = np.arange(len(targets)) if groups is None else np.asarray(groups)
    k = min(folds, len(set(units.tolist())))
    if k < 2:
        return {"folds": k, "nll_fitted": math.nan, "nll_plain": math.nan, "holds_up": False}
    # GroupKFold deals whole groups by size (no shuffle before scikit-learn 1.6, which the course does not need)
    splitter = KFold(k, shuffle=True, random_state=seed) if groups is None else GroupKFold(k)
    fitted = plain = 0.0
    for fit_part, held in splitter.split(np.arange(len(targets)), groups=None if groups is None else units):
        fit_part, held = torch.as_tensor(fit_part), torch.as_tensor(held)
        with warnings.catch_warnings():  # a fold's fit at the search limit is still the fit that fold gives
            warnings.simplefilter("ignore", TemperatureLimitWarning)
            temperature = fit_temperature(logits[fit_part], targets[fit_part])
        fitted += _nll(logits[held], targets[held], temperature) * len(held)
        plain += _nll(logits[held], targets[held], 1.0) * len(held)
    fitted, plain = fitted / len(targets), plain / len(targets)
    return {"folds": k, "nll_fitted": fitted, "nll_plain": plain, "holds_up": fitted < plain}


def apply_temperature(pred: pd.DataFrame, temperature: float, classes: Sequence[str]) -> pd.DataFrame:
    """A copy of ``pred`` with prob_, confidence, predicted and pred recomputed from ``logit_ / T``."""
    classes = list(classes)
    _check_pred(pred, classes, need_logits=True)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.as_tensor(pred[_logit_cols(classes)].to_numpy(dtype=float))
    probs = (logits / temperature).softmax(1).numpy()
    out = pred.copy()
    out[_prob_cols(classes)] = probs
    out["confidence"] = probs.max(1)
    out["predicted"] = probs.argmax(1).astype(int)
    out["pred"] = [classes[i] for i in out["predicted"]]
    return out


def probs_and_targets(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (N, classes) probability matrix and the target indices of a prediction table."""
    _check_pred(pred, classes)
    return pred[_prob_cols(classes)].to_numpy(dtype=float), pred["target"].to_numpy().astype(int)


def logits_and_targets(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (N, classes) logit matrix and the target indices (input of `fit_temperature`)."""
    _check_pred(pred, classes, need_logits=True)
    return pred[_logit_cols(classes)].to_numpy(dtype=float), pred["target"].to_numpy().astype(int)


# ----------------------------------------------------------------------------------------
# Plots (each returns its Figure; close it with plt.close(fig) when done)


MAX_MATRIX_INCHES = 14  # the confusion matrix's width at most, however many classes
MAX_CELL_NUMBERS = 25  # classes up to which each cell of the confusion matrix shows its number


def plot_confusion_matrix(pred: pd.DataFrame, classes: Sequence[str], normalize: bool = False) -> Figure:
    """Confusion matrix (rows: true class); ``normalize=True`` shows each row as shares (recall)."""
    classes = list(classes)
    _check_pred(pred, classes)
    # 1.2 in a cell would make 100 classes a 122-inch figure; past MAX_CELL_NUMBERS the numbers overlap: colours
    # (and a colour bar to read them) only.
    side = min(1.2 * len(classes), MAX_MATRIX_INCHES - 2.5)
    many = len(classes) > MAX_CELL_NUMBERS
    fig, ax = plt.subplots(figsize=(side + 2.5, side + 2))
    ConfusionMatrixDisplay.from_predictions(
        pred["target"], pred["predicted"], labels=list(range(len(classes))), display_labels=classes,
        normalize="true" if normalize else None, values_format=".2f" if normalize else "d",
        include_values=not many, xticks_rotation="vertical" if many else "horizontal",
        cmap="Blues", colorbar=many, ax=ax)
    if many:
        ax.tick_params(labelsize=max(4, min(8, 400 / len(classes))))
    acc = accuracy_score(pred["target"], pred["predicted"])
    ax.set_title(f"{'recall per row' if normalize else 'counts'}; accuracy {acc:.3f}, n={len(pred)}"
                 + (f"; {len(classes)} classes, numbers left out" if many else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_roc_pr(pred: pd.DataFrame, classes: Sequence[str]) -> Figure:
    """ROC and precision-recall curves: of the positive (last) class for two classes, one
    curve per class (one-vs-rest) otherwise. Classes absent from ``pred`` are listed, not drawn."""
    classes = list(classes)
    probs, targets = probs_and_targets(pred, classes)
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    positives = [len(classes) - 1] if len(classes) == 2 else list(range(len(classes)))
    absent = [classes[i] for i in positives if not (targets == i).any() or (targets == i).all()]
    for i in positives:
        if classes[i] in absent:
            continue
        RocCurveDisplay.from_predictions(targets == i, probs[:, i], name=classes[i], ax=roc_ax)
        PrecisionRecallDisplay.from_predictions(targets == i, probs[:, i], name=classes[i], ax=pr_ax)
    roc_ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate")
    pr_ax.set(xlabel="recall", ylabel="precision")
    roc_ax.legend(loc="lower right", fontsize=8)
    roc_ax.set_title("ROC" + (" (one-vs-rest)" if len(classes) > 2 else f" of '{classes[-1]}'"))
    pr_ax.set_title("precision-recall" + (f"; not drawn (one class only): {absent}" if absent else ""))
    fig.tight_layout()
    return fig


def plot_learning_curves(history: pd.DataFrame, kept: str = "best") -> Figure:
    """Loss and accuracy (plus the selection metric, if any) per epoch, train vs validation.

    The best validation epoch is marked (grey, dotted): the checkpoint `fit` keeps. With ``kept="last"``
    (``restore_best=False``, as notebook 04's floor judges phase 2) the last epoch is marked too (black, dashed).
    """
    if kept not in ("best", "last"):
        raise ValueError(f"kept must be 'best' or 'last', got {kept!r}")
    needed = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    missing = [c for c in needed if c not in history.columns]
    if missing:
        raise KeyError(f"history lacks column(s) {missing}; its columns are {list(history.columns)}")
    if len(history) == 0:
        raise ValueError("the history is empty (no epoch finished)")
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(history["epoch"], history["train_loss"], "o-", label="train")
    loss_ax.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.plot(history["epoch"], history["train_accuracy"], "o-", label="train accuracy")
    acc_ax.plot(history["epoch"], history["val_accuracy"], "o-", label="validation accuracy")
    extra = [c for c in history.columns if c.startswith("val_") and c not in ("val_loss", "val_accuracy")]
    for col in extra:
        acc_ax.plot(history["epoch"], history[col], "s--", label=col.replace("_", " "))
    chosen = extra[0] if extra else "val_accuracy"
    best = history.loc[history[chosen].idxmax()]
    last = int(history["epoch"].iloc[-1])
    for ax in (loss_ax, acc_ax):
        ax.axvline(best["epoch"], color="grey", ls=":", lw=1)
        if kept == "last":
            ax.axvline(last, color="black", ls="--", lw=1)
        ax.legend(fontsize=8)
    title = f"scores (best {chosen} at epoch {int(best['epoch'])}"
    acc_ax.set(xlabel="epoch", ylabel="score", title=title + (f"; judged: epoch {last}, the last)" if kept == "last"
                                                              else ")"))
    fig.tight_layout()
    return fig


def plot_reliability(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> Figure:
    """Reliability diagram of the top-label confidence, with its ECE and a histogram of confidences."""
    from sklearn.calibration import calibration_curve

    probs, targets = _check_probs(probs, targets)
    confidence = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(int)
    fig, (ax, hist_ax) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    if len(np.unique(correct)) == 2:
        accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    else:  # all right or all wrong: calibration_curve needs both outcomes, the bins are trivial
        accuracy, mean_conf = np.array([correct.mean()]), np.array([confidence.mean()])
    ax.plot(mean_conf, accuracy, "o-", label="model")
    ece = expected_calibration_error(probs, targets, n_bins)
    ax.set(ylabel="accuracy in bin", title=f"reliability (ECE {ece:.3f}, n={len(targets)})",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    hist_ax.hist(confidence, bins=n_bins, range=(0, 1), color="grey")
    hist_ax.set(xlabel="confidence (top probability)", ylabel="images")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Error analysis


def most_confident_mistakes(pred: pd.DataFrame, k: int = 12) -> pd.DataFrame:
    """The ``k`` wrong predictions the model was surest about (label noise shows up here first).

    Keeps ``pred``'s index, which `predict` sets to the image's position in the dataset.
    """
    _check_pred(pred, [])
    if "confidence" not in pred.columns:
        raise KeyError(f"prediction table lacks column 'confidence'; its columns are {list(pred.columns)}")
    wrong = pred[pred["predicted"] != pred["target"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(k)


def _grid(n: int, ncols: int = 4, size: float = 2.8) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def _dataset_positions(dataset, files: Sequence[str]) -> list[int]:
    where = {f: i for i, f in enumerate(dataset.frame["file"])}
    missing = [f for f in files if f not in where]
    if missing:
        raise KeyError(f"{len(missing)} file(s) of the prediction table are not in the dataset: {missing[:5]}")
    return [where[f] for f in files]


def plot_mistakes(pred: pd.DataFrame, dataset: Dataset, k: int = 12) -> Figure:
    """The ``k`` most confident mistakes as an image grid: true class, predicted class, probability."""
    _check_dataset(dataset)
    mistakes = most_confident_mistakes(pred, k)
    if len(mistakes) == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no mistakes among {len(pred)} images", ha="center", va="center")
        return fig
    fig, axes = _grid(len(mistakes))
    # the grid may hold more axes than images (a last row part-filled): zip stops at the images
    for ax, pos, (_, row) in zip(axes, _dataset_positions(dataset, mistakes["file"]), mistakes.iterrows(),
                                 strict=False):
        ax.imshow(dataset.load(pos).permute(1, 2, 0).numpy())
        ax.set_title(f"{Path(row['file']).name}\ntrue {row['true']} / pred {row['pred']}\n"
                     f"p = {row['confidence']:.2f}", fontsize=8)
    fig.suptitle(f"{len(mistakes)} most confident mistakes of {int((pred['predicted'] != pred['target']).sum())}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Grad-CAM


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The module whose output global pooling reads: the last spatial feature map, after the residual
    additions, normalization and activation that end the network (pytorch-grad-cam's advice: ResNet's
    ``layer4``, not the last ``nn.Conv2d`` inside its last block, which misses the skip path).

    Candidates, in the order they run: every group but the head and the classifier, then the head's own
    modules up to its pooling; the last one that outputs a 4-D map is the target. One small forward pass
    finds it. Works on every `TransferModel`, truncated ones too."""
    groups = getattr(model, "groups", None)
    if groups is None:
        raise TypeError(f"expected a TransferModel from helpers.models.create_model, got {type(model).__name__}")
    candidates = [group for name, group in groups.items() if name not in ("head", "classifier")]
    for module in groups["head"].children() if "head" in groups else []:
        if "Pool" in type(module).__name__:
            break  # what follows the pooling (ConvNeXt's LayerNorm2d) sees a 1 x 1 map
        if not isinstance(module, (nn.Identity, nn.Dropout)):
            candidates.append(module)
    spatial = []
    hooks = [module.register_forward_hook(
        lambda mod, inp, out: spatial.append(mod) if torch.is_tensor(out) and out.ndim == 4 else None)
        for module in candidates]
    parameter = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not spatial:
        raise ValueError(f"no spatial feature map before the classifier in groups {list(groups)}; Grad-CAM needs one")
    return spatial[-1]


def _normalize_of(dataset, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std the dataset's transform normalized with (to show the image the model saw)."""
    from torchvision.transforms import v2

    transform = getattr(dataset, "transform", None)
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    norms = [t for t in steps if isinstance(t, v2.Normalize)]
    mean, std = (norms[-1].mean, norms[-1].std) if norms else (model.spec.mean, model.spec.std)
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


def gradcam_maps(model: nn.Module, dataset: Dataset, indices: Sequence[int], target_class: int | str | None = None,
                 target_layer: nn.Module | None = None,
                 device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM heat maps for ``dataset[indices]``.

    Returns (images, cams, probs): images as the model saw them, un-normalized, (N, H, W, 3)
    floats in [0, 1]; heat maps (N, H, W) in [0, 1] at the same size; softmax probabilities
    (N, classes). ``target_class`` (name or index) explains that class; None explains each
    image's predicted class.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _check_dataset(dataset)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no indices given")
    if isinstance(target_class, str):
        if target_class not in dataset.classes:
            raise ValueError(f"unknown target_class {target_class!r}; classes are {dataset.classes}")
        target_class = dataset.classes.index(target_class)
    if target_class is not None and not 0 <= int(target_class) < len(dataset.classes):
        raise ValueError(f"target_class {target_class} out of range; classes are {dataset.classes}")
    device = pick_device(device)
    model.eval().to(device)
    x = torch.stack([dataset[i][0] for i in indices]).to(device)
    with torch.no_grad():
        probs = model(x).float().softmax(1).cpu().numpy()
    chosen = probs.argmax(1) if target_class is None else [target_class] * len(indices)
    # A frozen backbone gives activations without gradients; asking for the input gradient
    # makes autograd track them, without changing any weight's requires_grad.
    x = x.clone().requires_grad_(True)
    layer = target_layer or gradcam_target_layer(model)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        cams = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in chosen])
    mean, std = _normalize_of(dataset, model)
    images = (x.detach().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return images, cams, probs


def gradcam_overlays(model: nn.Module, dataset: Dataset, indices: Sequence[int], target_class: int | str | None = None,
                     target_layer: nn.Module | None = None, device: str | torch.device | None = None) -> Figure:
    """A grid of Grad-CAM heat maps over the images (as the model saw them, un-normalized),
    titled with the true class and the predicted class and its probability."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    images, cams, probs = gradcam_maps(model, dataset, indices, target_class, target_layer, device)
    classes = list(dataset.classes)
    fig, axes = _grid(len(indices))
    for ax, i, image, heat, p in zip(axes, indices, images, cams, probs, strict=False):  # spare axes stay blank
        ax.imshow(show_cam_on_image(image.astype(np.float32), heat, use_rgb=True))
        true = dataset.frame["label"].iat[i]
        ax.set_title(f"true {true}\npred {classes[int(p.argmax())]} ({p.max():.2f})", fontsize=8)
    if isinstance(target_class, int):
        target_class = classes[target_class]
    fig.suptitle("Grad-CAM for the " + ("predicted class" if target_class is None else f"class {target_class}"))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Results files and the literature


def published_results() -> pd.DataFrame:
    """Published ELPV results to set a run beside. Values are fractions (0.8842 = 88.42 %).

    Protocols differ and no official split exists, so a difference of a point or two says
    little: read the ``protocol`` column before comparing.
    """
    deitsch = ("Deitsch et al. 2019, Solar Energy 185, doi 10.1016/j.solener.2019.02.067",
               "75/25 split stratified over the classes (1,968 train / 656 test), both cell types; "
               "'average accuracy' not defined (binary at p>=0.5 or over the 4 classes)")
    song = ("Song et al. 2024, J. Quality Technology",
            "separate models per cell type, stratified 80/20 split, repeated")
    song_binary = (song[0], song[1] + "; binary: the four classes merged into functional and defective")
    # ``task``: this workbook's task name ("binary", "4class") or "unclear". ``cell_type``: "all" (one model, both
    # types scored together), "mono" or "poly", or "mono and poly" (a model per type, each scoring about this).
    rows = [
        (*deitsch, "VGG-19 (ImageNet, fine-tuned)", "unclear", "all", "accuracy", 0.8842, False),
        (*deitsch, "SVM on hand-crafted features", "unclear", "all", "accuracy", 0.8244, False),
        (*song, "VGG-19", "4class", "mono", "accuracy", 0.81, True),
        (*song, "VGG-19", "4class", "poly", "accuracy", 0.80, True),
        (*song, "VGG-19", "4class", "mono", "macro_f1", 0.63, False),
        (*song, "VGG-19", "4class", "poly", "macro_f1", 0.59, False),
        (*song_binary, "VGG-19", "binary", "mono and poly", "accuracy", 0.90, True),
    ]
    return pd.DataFrame(rows, columns=["source", "protocol", "model", "task", "cell_type", "metric", "value",
                                       "approximate"])


def published_comparison(published: pd.DataFrame, task: str, metrics: dict,
                         pred: pd.DataFrame | None = None, units: Sequence | None = None) -> list[str]:
    """One Markdown line per published figure that may be for ``task``, beside this run's test score in the same
    metric and on the same cell types (both together for ``cell_type`` "all"; per group, from
    ``metrics["per_group"]``, for "mono", "poly" and "mono and poly"). A figure of the same task gets the signed
    difference and, given the test predictions ``pred`` (`predict`'s table), two bootstrap standard errors of this
    run's score on those images, √2 times that for the difference (the published figure is as noisy, on a test
    set of similar size) and the verdict; a figure whose task is unclear gets none of these, since it may be
    another task's. With ``units`` (each test image's subject or picture with its copies, in ``pred``'s order)
    the margin is the wider of the per-image one and the one over whole units."""
    lines = []
    for row in published.itertuples():
        if row.task not in (task, "unclear"):
            continue
        groups = ["all"] if row.cell_type == "all" else [g.strip() for g in row.cell_type.split(" and ")]
        for group in groups:
            if group == "all":
                ours, where, rows, members = metrics[f"test_{row.metric}"], "both cell types", pred, units
            elif group in metrics.get("per_group", {}):
                ours, where = metrics["per_group"][group][row.metric], f"{group} cells"
                if len(groups) > 1:  # one figure for the paper's models of every type, not one per type
                    where += f" (the paper gives one figure for its {' and '.join(groups)} models)"
                rows = None if pred is None else pred[pred["group"] == group]
                members = None if units is None or pred is None else np.asarray(units)[(pred["group"] == group)
                                                                                       .to_numpy()]
            else:
                continue  # a group this run did not score
            value, name = f"{'≈' if row.approximate else ''}{row.value:.3f}", row.metric.replace("_", "-")
            head = f"- {row.source.split(',')[0]}: {row.model}"
            if row.task == "unclear":
                lines.append(f"{head} (task not stated), {where}, {name}: {value}; this run {ours:.3f} (no "
                             f"difference given: the figure may be for the other task)")
                continue
            difference = ours - row.value
            detail = f"{difference:+.3f}"
            if rows is not None and len(rows):
                margin = score_margin(row.metric, rows["target"].to_numpy(), rows["predicted"].to_numpy())
                if members is not None:  # images of one subject (or copies) err together: never narrower
                    margin = max(margin, score_margin(row.metric, rows["target"].to_numpy(),
                                                      rows["predicted"].to_numpy(), groups=members))
                # The published figure has noise of its own: on a test set of similar size, the difference is
                # about sqrt(2) times as noisy as this run's score alone.
                both = math.sqrt(2) * margin
                verdict = ("within the noise" if abs(difference) <= both else
                           f"{'above' if difference > 0 else 'below'} it by more than the noise")
                detail += (f"; its {len(rows)} images show one subject, so the noise cannot be measured"
                           if math.isinf(margin) else
                           f"; two standard errors of this run's score on its {len(rows)} images: ±{margin:.3f}, "
                           f"of the difference about ±{both:.3f}: {verdict}"
                           if margin > 0 else f"; every resample of its {len(rows)} images scores the same, so the "
                           f"bootstrap cannot measure its noise")
            lines.append(f"{head} ({row.task}), {where}, {name}: {value}; this run {ours:.3f} ({detail})")
    return lines


def _fit_epochs(fit_summary: dict) -> int:
    for key in ("epochs_run", "epochs"):
        if fit_summary.get(key) is not None:
            return int(fit_summary[key])
    if isinstance(fit_summary.get("config"), dict) and "epochs" in fit_summary["config"]:
        return int(fit_summary["config"]["epochs"])
    raise KeyError(f"fit_summary needs 'epochs_run', 'epochs' or config['epochs'] (fit.json has the last); "
                   f"its keys are {sorted(fit_summary)}")


def summarize_run(pred: pd.DataFrame, classes: Sequence[str], ckpt: dict, fit_summary: dict, ece: float,
                  ece_after: float, temperature: float, tta_pred: pd.DataFrame | None = None,
                  tta: str | None = None, baselines: dict | None = None, final: str | None = None,
                  augment: str | None = None, candidate: str | None = None) -> dict:
    """The ``metrics.json`` of notebook 05 (keys listed in this module's docstring).

    ``ckpt`` is the loaded best checkpoint, ``fit_summary`` the run's ``fit.json`` (or
    ``{**history.attrs, "epochs": len(history)}``); ``candidate`` the strategy the floor judged (``final.json``).
    """
    classes = list(classes)
    if "train_seconds" not in fit_summary:
        raise KeyError(f"fit_summary lacks 'train_seconds'; its keys are {sorted(fit_summary)}")
    if (tta_pred is None) != (tta is None):
        raise ValueError("give tta_pred together with the tta mode that made it (e.g. 'hflip'), or neither")
    for field in ("backbone", "strategy", "preprocessing"):
        if field not in ckpt:
            raise KeyError(f"checkpoint lacks {field!r}; is it a helpers checkpoint? keys: {sorted(ckpt)}")
    if ckpt.get("classes") is not None and list(ckpt["classes"]) != classes:
        raise ValueError(f"classes {classes} differ from the checkpoint's {ckpt['classes']}")
    m = compute_metrics(pred, classes)
    meta = ckpt.get("meta") or {}
    baselines = baselines or {}
    scratch = baselines.get("scratch") or {}
    summary = {
        "test_accuracy": m["accuracy"],
        "test_balanced_accuracy": m["balanced_accuracy"],
        "test_macro_f1": m["macro_f1"],
        "test_roc_auc": m["roc_auc"],
        "baseline_majority": (baselines.get("majority") or {}).get("accuracy"),
        "baseline_majority_macro_f1": (baselines.get("majority") or {}).get("macro_f1"),
        "baseline_probe": (baselines.get("probe") or {}).get("accuracy"),
        "baseline_probe_balanced_accuracy": (baselines.get("probe") or {}).get("balanced_accuracy"),
        "baseline_probe_macro_f1": (baselines.get("probe") or {}).get("macro_f1"),
        "baseline_scratch_val": scratch.get("score"),
        "pretrained_val_same_budget": scratch.get("pretrained_score"),
        "selection_metric": scratch.get("metric"),
        "final_model": final,
        "candidate_strategy": candidate,
        "per_group": m["per_group"],
        "per_class": m["per_class"],
        "ece": float(ece),
        "ece_after_temperature": float(ece_after),
        "ece_by_chance": ece_by_chance(probs_and_targets(pred, classes)[0]),
        "temperature": float(temperature),
        "tta_accuracy": compute_metrics(tta_pred, classes)["accuracy"] if tta_pred is not None else None,
        "tta": tta,
        "augment": augment,
        "backbone": ckpt["backbone"],
        "strategy": dict(ckpt["strategy"]),
        "image_size": int(ckpt["preprocessing"]["image_size"]),
        "epochs": _fit_epochs(fit_summary),
        "train_seconds": float(fit_summary["train_seconds"]),
        "task": meta.get("task", fit_summary.get("task")),
        "classes": classes,
        "n_test": int(len(pred)),
    }
    if tuple(summary) != METRICS_KEYS:  # the documented schema and the dict stay in step (not an assert: -O)
        raise RuntimeError(f"metrics.json keys {list(summary)} differ from METRICS_KEYS {list(METRICS_KEYS)}")
    return summary
