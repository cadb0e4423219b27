"""Choosing what to fine-tune, honestly: every pretrained strategy under one recipe and one budget, with its noise.

The recipe is the two-phase one every anchor course teaches (Keras's guide, fastai's ``fine_tune``,
Deitsch et al. 2019 on ELPV): phase 1 trains the new classifier on the frozen backbone, here to
convergence with a convex solver (`helpers.probe`); phase 2 unfreezes the strategy's groups and
trains them with a lower learning rate for earlier layers. ``head`` is phase 1 alone (the linear
probe); ``truncate`` is phase 1 on the pooled features of a later stage ("keep the early layers,
put a new head on them"); ``scratch`` is the control: the whole network from random weights, on the
same images, size and epochs, with the rate and BatchNorm that random weights need (`control_budget`), to
show what the pretrained start is worth.

Scores come with their noise. With a validation split of at least ``MIN_HOLDOUT`` images we
score on it (paired standard errors of the differences); with fewer, k-fold cross-validation on
train + validation. A strategy within two standard errors of the best (``TIE_SE``) counts as a
tie, and ties go to the cheaper strategy.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from .data import ImageDataset, fold_count, fold_units, subject_folds, subsample, units_of
from .errors import InputError
from .freezing import apply_strategy, truncation_point
from .metrics import bootstrap_scores, class_weighting, score, subject_count
from .models import TransferModel, create_model
from .probe import Probe, fit_probe, install_probe, pooled_features
from .runtime import seed_everything
from .transforms import eval_transform, train_transform

# Validation images below which one split is too noisy to rank strategies: with 250 images the standard
# error of an accuracy near 0.85 is 2.3 points, and cross-validation (which scores every train + validation
# image once) costs k times as much.
MIN_HOLDOUT = 250
TIE_SE = 2.0  # a difference smaller than this many standard errors is within the noise
CONTROL = "scratch"
# Cost order for ties: what trains least and runs fastest first (truncate trains a few hundred weights
# and drops the last stages; head trains a linear layer on the whole network's features).
COST_ORDER = ("truncate", "head", "last_n", "initial", "full", CONTROL)
STRATEGY_OPTIONS = {"last_n": {"n": 2}, "initial": {"n": 2}, "truncate": {"n": 1}}


@dataclass(frozen=True)
class Budget:
    """How each candidate trains in a comparison (phase 2; phase 1 is solved exactly)."""

    image_size: int
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    layer_decay: float = 0.8
    label_smoothing: float = 0.1
    augment: str = "none"
    cache: str | bool = "auto"  # True also caches augmented views (fixed ones, cycled through)
    cache_views: int = 1
    max_train: int | None = None  # subsample the training part of each fold to at most this many images
    patience: int | None = None  # early stopping
    freeze_batchnorm: bool = True  # keep BatchNorm statistics, as phase 2 does (see helpers.training.TrainConfig)


# The from-scratch control trains with what training from random weights needs, on the same images, size, epochs
# and batches: a pretrained network's small rate, layer decay and kept BatchNorm statistics protect features
# that a random network does not have, and would leave it barely trained (a strawman, not a control).
SCRATCH_LR_FACTOR = 10


def control_budget(budget: Budget) -> Budget:
    """``budget`` as the from-scratch control uses it: 10x the learning rate, no layer decay, BatchNorm
    statistics learned from the data."""
    return replace(budget, lr=budget.lr * SCRATCH_LR_FACTOR, layer_decay=1.0, freeze_batchnorm=False)


def strategy_options(strategy: str, model: TransferModel | None = None) -> dict:
    """The options the course uses for each strategy (and where truncate cuts, given the model)."""
    options = dict(STRATEGY_OPTIONS.get(strategy, {}))
    if strategy == "truncate" and model is not None:
        options["after"] = truncation_point(model)
    return options


def build_model(backbone: str, num_classes: int, strategy: str, pretrained: bool = True) -> TransferModel:
    """A fresh model frozen for ``strategy`` (``scratch``: random weights, everything trains)."""
    if strategy == CONTROL:
        return apply_strategy(create_model(backbone, num_classes, pretrained=False), "full")
    model = create_model(backbone, num_classes, pretrained=pretrained)
    return apply_strategy(model, strategy, **strategy_options(strategy, model))


def trains_beyond_classifier(model: TransferModel) -> bool:
    """Whether phase 2 has anything to train besides the (already solved) classifier."""
    return any(p.requires_grad for name, g in model.groups.items() if name != "classifier" for p in g.parameters())


def protocol(n_val: int, min_holdout: int = MIN_HOLDOUT, folds: int = 3) -> dict:
    """Holdout on the validation split when it is large enough, else k-fold on train + validation."""
    if n_val >= min_holdout:
        return {"name": "holdout", "folds": 1, "why": f"{n_val} validation images (>= {min_holdout})"}
    return {"name": "k-fold", "folds": folds,
            "why": f"only {n_val} validation images (< {min_holdout}): {folds}-fold cross-validation on "
                   f"train + validation instead of one noisy split"}


def make_folds(train: pd.DataFrame, val: pd.DataFrame, plan: dict, seed: int, *,
               root: str | Path) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(fit part, score part) per fold: the given split, or stratified folds of train + val. Each fold keeps
    whole the subjects (when the tables have a ``subject`` column, as `helpers.data.make_splits` splits them)
    and the byte-identical copies of a picture under ``root`` (`helpers.data.fold_units`)."""
    if plan["name"] == "holdout":
        return [(train, val)]
    pool = pd.concat([train, val], ignore_index=True)
    labels = pool["label"].to_numpy()
    units = fold_units(root, pool)
    folds = fold_count(labels, units, plan["folds"])
    if folds < 2:
        raise InputError(f"cannot cross-validate: a class has fewer than 2 images (or its images are all of one "
                         f"subject, or copies of one picture) among {len(pool)}")
    parts = (StratifiedKFold(folds, shuffle=True, random_state=seed).split(pool, labels) if units is None
             else subject_folds(labels, units, folds, seed))
    return [(pool.iloc[a].reset_index(drop=True), pool.iloc[b].reset_index(drop=True)) for a, b in parts]


def _datasets(root: Path, fit_part: pd.DataFrame, score_part: pd.DataFrame, classes: list[str], model: TransferModel,
              budget: Budget, crop_pct: float | None) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(plain train, augmented train, validation) datasets of one fold."""
    plain = eval_transform(model, budget.image_size, crop_pct)
    augmented = train_transform(model, budget.image_size, budget.augment, crop_pct)
    subject = "subject" if "subject" in fit_part.columns else None  # kept for phase 1's cross-validation
    columns = ["file", "label"] + ([subject] if subject else [])
    make = lambda frame, tf: ImageDataset(root, frame[columns], classes=classes, transform=tf,  # noqa: E731
                                          subject_col=subject)
    return make(fit_part, plain), make(fit_part, augmented), make(score_part, plain)


def phase_one(model: TransferModel, train: ImageDataset, device: str | torch.device, seed: int,
              metric: str = "accuracy") -> Probe:
    """Fit the classifier on the frozen features exactly (convex, for ``metric``: `fit_probe`) and put it
    into ``model``."""
    started = time.perf_counter()
    probe = fit_probe(*pooled_features(model, train, device), seed=seed, metric=metric, groups=units_of(train))
    install_probe(model, probe)
    probe.seconds = time.perf_counter() - started
    return probe


def start_from_probe(model: TransferModel, baseline: TransferModel, train: ImageDataset,
                     device: str | torch.device, seed: int,
                     metric: str = "accuracy") -> None:
    """Phase 1 for ``model``'s strategy, given ``baseline``, the linear probe (a ``head`` model whose classifier
    phase 1 fitted): last_n, initial and full read the same frozen features up to the classifier, so they
    start from the probe's classifier; truncate fits its own on the cut network's features."""
    if model.strategy["name"] == "truncate":
        phase_one(model, train, device, seed, metric)
    else:
        model.groups["classifier"].load_state_dict(baseline.groups["classifier"].state_dict())


# Phase 1 of the pretrained strategies other than truncate is the same probe (same frozen network up
# to the head, same images): fitted once per fold and reused. Keyed by everything it depends on.
_FOLD_PROBES: dict[tuple, Probe] = {}


def _shared_phase_one(model: TransferModel, strategy: str, train: ImageDataset, device: str | torch.device, seed: int,
                      budget: Budget, crop_pct: float | None, metric: str) -> tuple[Probe, bool]:
    """The fold's phase-1 probe, installed in ``model``; and whether it was reused (fitted for an earlier
    candidate, whose time it was counted in)."""
    if strategy == "truncate":  # another architecture: its own features
        return phase_one(model, train, device, seed, metric), False
    # The root, labels and classes too: a kernel rerun with another data_root or label_col has the same names.
    key = (model.spec.name, str(train.root), tuple(train.files), tuple(train.targets), tuple(train.classes),
           budget.image_size, crop_pct, seed, metric)
    if key in _FOLD_PROBES:
        install_probe(model, _FOLD_PROBES[key])
        return _FOLD_PROBES[key], True
    _FOLD_PROBES.clear()  # one fold at a time: keep memory flat
    _FOLD_PROBES[key] = phase_one(model, train, device, seed, metric)
    return _FOLD_PROBES[key], False


def phase_two(model: TransferModel, train: ImageDataset, val: ImageDataset, budget: Budget, seed: int,
              device: str | torch.device, **fit_options: object) -> pd.DataFrame:
    """Fine-tune the strategy's groups from the phase-1 classifier (see `helpers.training.fit`)."""
    from .training import fit

    cache = budget.cache
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="caching .* augmented view")  # chosen deliberately here
        return fit(model, train, val, epochs=budget.epochs, lr=budget.lr, batch_size=budget.batch_size,
                   layer_decay=budget.layer_decay, label_smoothing=budget.label_smoothing, warmup_epochs=0.5,
                   freeze_batchnorm=budget.freeze_batchnorm,
                   class_weights=class_weighting(fit_options.get("metric", "accuracy")),
                   cache=cache, cache_views=budget.cache_views, seed=seed, device=device,
                   **{"patience": budget.patience, **fit_options})


def evaluate_candidate(strategy: str, backbone: str, fit_part: pd.DataFrame, score_part: pd.DataFrame,
                       classes: list[str], root: Path, budget: Budget, crop_pct: float | None, seed: int,
                       device: str | torch.device, metric: str = "accuracy") -> dict:
    """Train ``strategy`` on one fold with the two-phase recipe; its validation score and predictions.

    ``seconds`` is what the strategy costs on its own: a phase-1 probe shared with an earlier candidate
    counts in full for each one that uses it, so the column does not depend on the order they ran in."""
    from .evaluation import predict

    started = time.perf_counter()
    seed_everything(seed)
    model = build_model(backbone, len(classes), strategy)
    fit_part = fit_part if budget.max_train is None else subsample(fit_part, budget.max_train, seed)
    plain, augmented, val = _datasets(root, fit_part, score_part, classes, model, budget, crop_pct)
    shared_seconds = 0.0
    if strategy != CONTROL:
        probe, reused = _shared_phase_one(model, strategy, plain, device, seed, budget, crop_pct, metric)
        shared_seconds = probe.seconds if reused else 0.0
    if trains_beyond_classifier(model):
        # Scored as it is after its last epoch: keeping its best epoch on the images it is then scored on
        # would flatter the strategies that train for epochs over the ones fitted once (head, truncate).
        phase_two(model, augmented, val, control_budget(budget) if strategy == CONTROL else budget, seed, device,
                  progress=False, metric=metric, restore_best=False)
    pred = predict(model, val, device=device)
    return {"strategy": strategy, "score": score(metric, pred["target"].to_numpy(), pred["predicted"].to_numpy()),
            "correct": (pred["target"] == pred["predicted"]).to_numpy(), "files": pred["file"].tolist(),
            "targets": pred["target"].to_numpy(), "predicted": pred["predicted"].to_numpy(),
            "subjects": units_of(val), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "seconds": time.perf_counter() - started + shared_seconds}


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of the difference in accuracy of two models scored on the same images."""
    diff = a.astype(float) - b.astype(float)
    return float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf


def difference_se(metric: str, targets: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, rounds: int = 1000,
                  seed: int = 0, groups: Sequence | None = None) -> float:
    """Standard error of ``score(a) - score(b)`` for two models' predictions on the same images: the paired
    formula for accuracy, a bootstrap over the images for the other metrics (they are not per-image means). With
    ``groups`` (each image's subject), a bootstrap over whole subjects for every metric, since the formula would
    treat one subject's images as independent evidence; never below the per-image error (with few subjects the
    subject bootstrap runs low), and infinite with a single subject (nothing to resample)."""
    if groups is not None:
        if subject_count(groups) < 2:
            return math.inf
        scores = bootstrap_scores(metric, targets, [pred_a, pred_b], rounds, seed, groups)
        return max(float(np.std(scores[:, 0] - scores[:, 1], ddof=1)),
                   difference_se(metric, targets, pred_a, pred_b, rounds, seed))
    if metric == "accuracy":
        return paired_se(pred_a == targets, pred_b == targets)
    scores = bootstrap_scores(metric, targets, [pred_a, pred_b], rounds, seed)
    return float(np.std(scores[:, 0] - scores[:, 1], ddof=1))


def floor_scores(metric: str, targets: np.ndarray, probe_pred: np.ndarray, tuned_pred: np.ndarray | None,
                 subjects: Sequence | None = None) -> dict:
    """The floor's evidence on validation: the probe's and the fine-tuned model's scores, and the noise of
    their difference (``TIE_SE`` standard errors; over whole groups given ``subjects``: subjects, or pictures
    with their copies, `helpers.data.units_of`); the fine-tuned model must clear it to replace the probe. The
    answer's ``subjects`` counts the groups (None without)."""
    targets, probe_pred = np.asarray(targets), np.asarray(probe_pred)
    out = {"n": len(targets), "probe": score(metric, targets, probe_pred), "fine_tuned": None, "noise": None,
           "subjects": subject_count(subjects)}
    if tuned_pred is not None:
        tuned_pred = np.asarray(tuned_pred)
        out["fine_tuned"] = score(metric, targets, tuned_pred)
        out["noise"] = TIE_SE * difference_se(metric, targets, tuned_pred, probe_pred, groups=subjects)
    return out


def summarize(runs: list[dict], guide_pick: str | None = None, metric: str = "accuracy") -> pd.DataFrame:
    """One row per strategy, best first (equal scores: the cheaper first, `COST_ORDER`): mean ``metric`` over
    folds, its standard error, the standard error of its difference to the best pretrained strategy on the
    same images (``se_vs_best``), on how many images its answer differs from the probe's
    (``differs_from_probe``), and its rank (1 = best).

    For accuracy both errors are the usual formulas on the per-image hits; macro-F1 and balanced accuracy are
    not means over images, so their errors come from a bootstrap over the images (paired for ``se_vs_best``;
    with several folds, over the folds' pooled predictions). Each run needs ``targets`` and ``predicted`` then,
    as `evaluate_candidate` returns them. When the runs carry ``subjects`` (the data names subjects, or stores
    pictures more than once: `helpers.data.units_of`), every error is a bootstrap over those groups, whole,
    accuracy's too, never below the per-image error (see `difference_se`)."""
    frame = pd.DataFrame(runs)
    table = frame.groupby("strategy").agg(score=("score", "mean"), folds=("score", "size"),
                                          trainable=("trainable", "first"), seconds=("seconds", "sum"))
    fold_se = frame.groupby("strategy")["score"].agg(lambda s: s.std(ddof=1) / math.sqrt(len(s)) if len(s) > 1
                                                     else np.nan)
    table["cost"] = [COST_ORDER.index(s) for s in table.index]
    table = table.sort_values(["score", "cost"], ascending=[False, True], kind="stable")
    best = next(s for s in table.index if s != CONTROL)
    subjects = None
    if "subjects" in frame.columns and frame["subjects"].notna().any():
        # A fold whose held-out images hold no copies has no units (None): each of its images is a unit of its own
        subjects = np.concatenate([np.asarray(units, dtype=str) if units is not None else
                                   np.array([f"fold {k}, image {i}" for i in range(len(correct))])
                                   for k, (units, correct) in enumerate(
                                       frame[frame["strategy"] == best][["subjects", "correct"]].itertuples(
                                           index=False))])
    if metric == "accuracy" and subjects is None:
        correct = {s: np.concatenate(list(g["correct"])) for s, g in frame.groupby("strategy")}
        one_fold_se = {s: math.sqrt(table.loc[s, "score"] * (1 - table.loc[s, "score"]) / len(correct[s]))
                       for s in table.index}
        vs_best = [paired_se(correct[best], correct[s]) if s != best else 0.0 for s in table.index]
    else:
        missing = {"targets", "predicted"} - set(frame.columns)
        if missing:
            raise ValueError(f"summarize({metric!r}) needs each run's {sorted(missing)} (as evaluate_candidate "
                             f"returns them): the error of {metric} is bootstrapped from the predictions")
        targets = np.concatenate(list(frame[frame["strategy"] == best]["targets"]))
        predicted = {s: np.concatenate(list(g["predicted"])) for s, g in frame.groupby("strategy")}
        names = list(table.index)
        def errors(groups) -> tuple[np.ndarray, np.ndarray]:  # (se of each, se of its difference to the best)
            if groups is not None and subject_count(groups) < 2:
                return np.full(len(names), np.inf), np.full(len(names), np.inf)
            boot = bootstrap_scores(metric, targets, [predicted[s] for s in names], groups=groups)
            best_column = boot[:, names.index(best)]
            return boot.std(axis=0, ddof=1), np.array([np.std(best_column - boot[:, k], ddof=1)
                                                       for k in range(len(names))])

        alone, versus = errors(None)
        if subjects is not None:  # over whole subjects, never below the per-image errors
            alone, versus = (np.maximum(a, b) for a, b in zip((alone, versus), errors(subjects), strict=True))
        one_fold_se = dict(zip(names, alone, strict=True))
        vs_best = [float(versus[k]) if s != best else 0.0 for k, s in enumerate(names)]
    table["se"] = [fold_se[s] if not np.isnan(fold_se[s]) else one_fold_se[s] for s in table.index]
    table["se_vs_best"] = vs_best
    table["differs_from_probe"] = _answers_changed(frame, table.index)
    table["rank"] = np.arange(1, len(table) + 1)
    table["guide_pick"] = table.index == guide_pick
    return table.drop(columns="cost").reset_index()


def _answers_changed(frame: pd.DataFrame, names) -> list[int] | list[float]:
    """Per strategy, on how many scored images its answer differs from the linear probe's (``head``): phase 2
    starts from the probe's classifier, so this is how far fine-tuning moved it. NaN without ``head`` or
    without the predictions."""
    if "head" not in set(frame["strategy"]) or not {"predicted", "files"} <= set(frame.columns):
        return [math.nan] * len(names)
    groups = dict(list(frame.groupby("strategy")))  # each strategy's folds, in the order they ran
    files = {s: [f for fold in g["files"] for f in fold] for s, g in groups.items()}
    predicted = {s: np.concatenate(list(g["predicted"])) for s, g in groups.items()}
    out = []
    for name in names:
        if files[name] != files["head"]:
            raise ValueError(f"{name} and head were scored on different images; compare runs of the same folds")
        out.append(int((predicted[name] != predicted["head"]).sum()))
    return out


def ties_with_best(table: pd.DataFrame) -> list[str]:
    """The pretrained strategies within ``TIE_SE`` paired standard errors of the best one."""
    pretrained = table[table["strategy"] != CONTROL]
    best = pretrained.iloc[0]["score"]
    return list(pretrained[pretrained["score"] >= best - TIE_SE * pretrained["se_vs_best"]]["strategy"])


def choose(table: pd.DataFrame) -> tuple[str, str]:
    """The best pretrained strategy; among those tied with it (within the noise), the cheapest."""
    pretrained = table[table["strategy"] != CONTROL].set_index("strategy")
    ties = ties_with_best(table)
    cheapest = min(ties, key=COST_ORDER.index)
    best = pretrained.index[0]
    if len(ties) == 1:
        return best, f"{best} scored best ({pretrained.loc[best, 'score']:.3f}), clear of the others"
    scores = ", ".join(f"{s} {pretrained.loc[s, 'score']:.3f}" for s in ties)
    return cheapest, (f"{len(ties)} strategies are within the noise of the best ({scores}); among them the course "
                      f"takes the cheapest, {cheapest} (cost order: {' < '.join(COST_ORDER[:-1])})")


def budget_dict(budget: Budget) -> dict:
    return asdict(budget)
