"""The scores the workbook selects and reports models by, one definition for training and evaluation."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def class_weighting(metric: str) -> str | None:
    """How training weighs the classes to optimize ``metric``: every image the same for accuracy; by inverse
    class frequency (``"balanced"``) for balanced accuracy and macro-F1, which count every class the same."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    return None if metric == "accuracy" else "balanced"


def score(metric: str, targets: np.ndarray, predictions: np.ndarray) -> float:
    """``metric`` of class-index predictions: accuracy; balanced accuracy (mean recall per class);
    macro-F1 (mean F1 over the classes that occur, 0 for a class never predicted)."""
    if metric == "accuracy":
        return float(accuracy_score(targets, predictions))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(targets, predictions))
    if metric == "macro_f1":
        return float(f1_score(targets, predictions, average="macro", zero_division=0))
    raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")


def resample_counts(n: int, rounds: int, seed: int = 0, groups: Sequence | None = None) -> np.ndarray:
    """How often each of ``n`` images is drawn in each of ``rounds`` bootstrap resamples: shape (rounds, n).

    Without ``groups``, images are drawn one by one. With ``groups`` (each image's subject: patient, specimen,
    writer), whole subjects are drawn, each bringing all its images: the *cluster* bootstrap. Images of one subject
    can be right or wrong together, and then they are not independent: resampling them one by one would
    understate the noise."""
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = np.stack([rng.integers(0, n, n) for _ in range(rounds)])  # one resample per row, as a loop draws them
        return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(float)
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} images")
    names, group_of = np.unique(groups.astype(str), return_inverse=True)
    draws = rng.integers(0, len(names), (rounds, len(names)))
    per_group = np.stack([np.bincount(row, minlength=len(names)) for row in draws])  # (rounds, subjects)
    return per_group[:, group_of].astype(float)  # each image as often as its subject was drawn


def bootstrap_scores(metric: str, targets: np.ndarray, predictions: list[np.ndarray], rounds: int = 1000,
                     seed: int = 0, groups: Sequence | None = None) -> np.ndarray:
    """``metric`` of each model in ``predictions`` on ``rounds`` bootstrap resamples of the images (the same
    resamples for every model, so differences stay paired): an array of shape (rounds, models). With ``groups``
    (each image's subject), whole subjects are resampled (`resample_counts`).

    The same numbers as calling `score` on ``targets[i]``, ``predictions[k][i]`` for each resample ``i``, computed
    from per-class counts in one matrix product instead of a loop of scikit-learn calls (a macro-F1 bootstrap on a
    few hundred images takes milliseconds, not seconds)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    targets = np.asarray(targets)
    counts = resample_counts(len(targets), rounds, seed, groups)  # (rounds, n) multiplicities
    drawn = counts.sum(1)  # images in each resample: n, or with subjects whatever the drawn subjects hold
    classes = np.union1d(targets, np.concatenate([np.asarray(p) for p in predictions]))
    is_target = (targets[:, None] == classes[None, :]).astype(float)  # (n, classes)
    support = counts @ is_target  # (rounds, classes): images of each class in each resample
    out = np.empty((rounds, len(predictions)))
    for k, pred in enumerate(predictions):
        pred = np.asarray(pred)
        if metric == "accuracy":
            out[:, k] = counts @ (pred == targets).astype(float) / drawn
            continue
        is_pred = (pred[:, None] == classes[None, :]).astype(float)
        hits = counts @ (is_target * is_pred)  # true positives per class
        if metric == "balanced_accuracy":  # mean recall over the classes present in the resample's targets
            present = support > 0
            out[:, k] = np.where(present, hits / np.where(present, support, 1), 0).sum(1) / present.sum(1)
        else:  # macro-F1 over the classes in targets or predictions; a class never predicted scores 0
            predicted = counts @ is_pred
            seen = (support + predicted) > 0
            f1 = np.where(seen, 2 * hits / np.where(seen, support + predicted, 1), 0)
            out[:, k] = f1.sum(1) / seen.sum(1)
    return out


def subject_count(groups: Sequence | None) -> int | None:
    """How many distinct subjects ``groups`` names (None without groups), counted as the bootstrap groups them."""
    return None if groups is None else len(np.unique(np.asarray(groups).astype(str)))


def subject_margin(metric: str, targets: np.ndarray, predictions: np.ndarray, groups: Sequence, rounds: int = 1000,
                   seed: int = 0) -> float:
    """Two standard errors of ``metric`` from resampling whole subjects (``groups``: each image's) alone;
    infinite with a single subject. `score_margin` reports the wider of this and the per-image margin."""
    if subject_count(groups) < 2:
        return math.inf
    return float(2 * bootstrap_scores(metric, targets, [predictions], rounds, seed, groups)[:, 0].std(ddof=1))


def score_margin(metric: str, targets: np.ndarray, predictions: np.ndarray, rounds: int = 1000,
                 seed: int = 0, groups: Sequence | None = None) -> float:
    """Two standard errors of one model's ``metric`` on these images, by bootstrap (`bootstrap_scores`): the
    noise of a score that is not a mean over images (macro-F1), and of accuracy without a formula's assumptions.
    0.0 when every resample scores the same (all right, or all wrong).

    With ``groups`` (each image's subject), whole subjects are resampled, and the answer is never below the
    per-image one: with a handful of subjects the subject bootstrap itself runs low. With one subject there is
    nothing to resample, and the margin is infinite: these images say nothing about other subjects."""
    per_image = float(2 * bootstrap_scores(metric, targets, [predictions], rounds, seed)[:, 0].std(ddof=1))
    return per_image if groups is None else max(subject_margin(metric, targets, predictions, groups, rounds, seed),
                                                per_image)
