"""The linear probe: logistic regression on a frozen backbone's pooled features.

It is the cheapest honest answer to "how good are the pretrained features for this data?", the
baseline every fine-tuned model must beat, and the `head` strategy trained to convergence:
with the backbone frozen, training only the classifier is a convex problem, so a
logistic-regression solver finds its optimum in seconds where many epochs of AdamW only approach it.

`fit_probe` chooses the regularization by cross-validation on the training features alone;
`install_probe` folds the probe (scaler + logistic regression) into the model's ``nn.Linear``,
so the probe becomes an ordinary `TransferModel` (strategy ``head``) that checkpoints, exports
and predicts like any other, and that phase 2 of the two-phase recipe starts from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Dataset

from .cache import extract_features
from .data import fold_count, subject_folds
from .errors import InputError
from .metrics import class_weighting
from .models import TransferModel, final_linear
from .runtime import pick_device

# Inverse regularization strengths tried by cross-validation (strong to weak).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class TrainingSpan(TransformerMixin, BaseEstimator):
    """The features' coordinates in the span of the (centred) training features, when there are at most half
    as many images as features; the features as they are otherwise.

    An L2-penalized linear model's weights lie in that span (its gradient is a sum over the training images),
    so this changes nothing about the optimum, only its size: with 100 images of 1,280 features the solver
    works on about 100 numbers per class instead of 1,280, and the cross-validation of C runs many times
    faster (many classes, few images each, made it take minutes)."""

    def fit(self, features: np.ndarray, targets: np.ndarray | None = None) -> "TrainingSpan":
        features = np.asarray(features, dtype=np.float64)
        self.mean_, self.components_ = features.mean(0), None
        if 2 * len(features) <= features.shape[1]:  # with more images the basis costs more than it saves
            # The span's orthonormal basis from the small images x images Gram matrix (cheaper than an SVD of the
            # images x features matrix): its eigenvectors u give the basis rows u.T @ centred / sqrt(eigenvalue).
            centred = features - self.mean_
            eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
            kept = eigenvalues > eigenvalues.max(initial=0.0) * 1e-10
            if kept.any():
                self.components_ = (vectors[:, kept].T @ centred) / np.sqrt(eigenvalues[kept])[:, None]
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        return features if self.components_ is None else (features - self.mean_) @ self.components_.T


@dataclass
class Probe:
    """A fitted probe: the scikit-learn pipeline, its chosen C and its cross-validated ``metric``."""

    pipeline: Pipeline
    C: float
    cv_score: float | None  # None when a class had too few images to cross-validate
    folds: int
    metric: str = "accuracy"
    seconds: float = 0.0  # feature extraction and fitting, when measured by the caller

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(features)

    def accuracy(self, features: np.ndarray, targets: np.ndarray) -> float:
        return float((self.predict(features) == np.asarray(targets)).mean())


def pooled_features(model: TransferModel, dataset: Dataset, device: str | torch.device | None = None,
                    batch_size: int = 64, num_workers: int | None = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets): the vector each image becomes just before the classifier, as numpy."""
    stop = len(model.group_names) - 1  # everything but the classifier
    features, targets = extract_features(model, dataset, stop, pick_device(device), batch_size, num_workers,
                                         "features", progress)
    return features.numpy().astype(np.float64), targets.numpy()


# scikit-learn's name for each of the course's metrics (helpers.metrics), as a cross-validation scorer.
_SCORERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "macro_f1": "f1_macro"}


def fit_probe(features: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0,
              grid: tuple[float, ...] = C_GRID, metric: str = "accuracy", groups: np.ndarray | None = None) -> Probe:
    """Standardize, then multinomial logistic regression, C chosen by stratified k-fold ``metric``.

    For ``accuracy`` every image counts the same. For ``macro_f1`` and ``balanced_accuracy``, metrics
    that count every class the same, the classes are weighted by inverse frequency
    (``class_weight="balanced"``), so the probe optimizes what it is judged on instead of ignoring
    rare classes. ``folds`` shrinks to the smallest class's count; with fewer than 2 images in some
    class there is nothing to cross-validate and C = 0.1 is used. ``groups`` (the images' subjects with
    ``subject_col``, and copies of one picture: `helpers.data.units_of`) keeps each group in one fold, so C is
    not chosen on subjects or pictures it was fitted on.
    """
    if metric not in _SCORERS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(_SCORERS)}")
    features, targets = np.asarray(features, dtype=np.float64), np.asarray(targets)
    counts = np.bincount(targets)
    if (counts > 0).sum() < 2:
        raise InputError(f"a probe needs at least two classes in the training features, got counts {counts}")
    folds = fold_count(targets, groups, folds)  # each class in every fold: images, or units with ``groups``
    class_weight = class_weighting(metric)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight=class_weight))
    with warnings.catch_warnings():
        # Strong regularization on few images converges slowly; the CV score already judges the result.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds < 2:
            pipeline.set_params(logisticregression__C=0.1).fit(features, targets)
            return Probe(pipeline, 0.1, None, 0, metric)
        # C is searched in the training span (the same optimum, found faster); the probe is then fitted once
        # on the features themselves, so that it is the plain scaler + logistic regression notebook 04 folds.
        searched = make_pipeline(StandardScaler(), TrainingSpan(),
                                 LogisticRegression(max_iter=2000, class_weight=class_weight))
        search = GridSearchCV(searched, {"logisticregression__C": list(grid)}, scoring=_SCORERS[metric],
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed) if groups is None
                              else subject_folds(targets, groups, folds, seed), n_jobs=1, refit=False)
        search.fit(features, targets)
        best = float(search.best_params_["logisticregression__C"])
        pipeline.set_params(logisticregression__C=best).fit(features, targets)
    return Probe(pipeline, best, float(search.best_score_), folds, metric)


def probe_linear(probe: Probe, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe as the weight and bias of one ``nn.Linear`` on the raw (unscaled) features.

    The scaler is folded in: w' = w / std, b' = b - w' . mean. scikit-learn stores a binary
    problem as one vector z; two logits (-z/2, z/2) give the same softmax probabilities.
    """
    scaler, logistic = probe.pipeline[0], probe.pipeline[-1]
    weight, bias = logistic.coef_, logistic.intercept_
    if weight.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])[1]
        weight, bias = np.vstack([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    full_w = np.zeros((num_classes, weight.shape[1]))
    full_b = np.full(num_classes, -1e4)  # a class absent from training is never predicted
    full_w[logistic.classes_], full_b[logistic.classes_] = weight, bias
    scale = scaler.scale_
    folded_w = full_w / scale
    folded_b = full_b - folded_w @ scaler.mean_
    return torch.tensor(folded_w, dtype=torch.float32), torch.tensor(folded_b, dtype=torch.float32)


@torch.no_grad()
def install_probe(model: TransferModel, probe: Probe) -> TransferModel:
    """Put the probe into ``model``'s classifier (its last ``nn.Linear``) and return the model."""
    linear: nn.Linear = final_linear(model.classifier)
    weight, bias = probe_linear(probe, linear.out_features)
    if weight.shape[1] != linear.in_features:
        raise ValueError(f"the probe was fitted on {weight.shape[1]} features but the classifier takes "
                         f"{linear.in_features}: fit it on this model's pooled features")
    linear.weight.copy_(weight.to(linear.weight.device))
    linear.bias.copy_(bias.to(linear.bias.device))
    return model


def majority_baseline(train_targets: np.ndarray, test_targets: np.ndarray) -> dict:
    """Always answer the most frequent training class: its accuracy, balanced accuracy and macro-F1 on
    ``test_targets`` (the same metrics, defined the same way, as every model is scored by)."""
    from .metrics import METRICS, score

    train_targets, test_targets = np.asarray(train_targets), np.asarray(test_targets)
    majority = int(np.bincount(train_targets).argmax())
    answers = np.full_like(test_targets, majority)
    return {"class_index": majority, **{metric: score(metric, test_targets, answers) for metric in METRICS}}
