"""The scores the workbook selects and reports models by, one definition for training and evaluation."""

from __future__ import annotations

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
