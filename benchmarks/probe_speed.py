"""How much faster is the probe's search for C in the training span, and does it choose the same C?

`helpers.probe.fit_probe` cross-validates C with the features projected onto the span of each fold's
training features (`TrainingSpan`): for an L2-penalized logistic regression that is the same optimum in
fewer numbers, when there are fewer images than features. This script times the search both ways, side by
side in one process (medians over ``--repeats``), on synthetic features shaped like the course's (1,280
pooled features, weakly separable classes), and reports the C each way chose and the cross-validated scores.

    python benchmarks/probe_speed.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from helpers.course import markdown_table
from helpers.probe import C_GRID, TrainingSpan

SHAPES = [(2, 40), (5, 20), (12, 9), (12, 40), (2, 800)]  # (classes, training images per class)


def search(features: np.ndarray, targets: np.ndarray, span: bool) -> tuple[float, float, float]:
    """(seconds, chosen C, its cross-validated accuracy) of the course's grid search, with or without the span."""
    steps = [StandardScaler(), *([TrainingSpan()] if span else []), LogisticRegression(max_iter=2000)]
    grid = GridSearchCV(make_pipeline(*steps), {"logisticregression__C": list(C_GRID)}, scoring="accuracy",
                        cv=StratifiedKFold(5, shuffle=True, random_state=0), n_jobs=1, refit=False)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # as fit_probe does
        grid.fit(features, targets)
    return time.perf_counter() - started, grid.best_params_["logisticregression__C"], grid.best_score_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--separation", type=float, default=0.3, help="class centres' scale (0.3: CV accuracy "
                        "about 0.6-1.0, as the course's datasets)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for classes, per_class in SHAPES:
        targets = np.repeat(np.arange(classes), per_class)
        centres = rng.normal(size=(classes, 1280)) * args.separation
        features = np.abs(rng.normal(size=(len(targets), 1280)) + centres[targets])  # pooled ReLU-like features
        times, chosen = {True: [], False: []}, {}
        for _ in range(args.repeats):
            for span in (False, True):  # interleaved, so a busy moment hits both
                seconds, c, cv = search(features, targets, span)
                times[span].append(seconds)
                chosen[span] = (c, cv)  # the same every repeat: the folds are seeded
        plain, fast = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"classes": classes, "images": len(targets), "plain s": round(plain, 2),
                     "span s": round(fast, 2), "speed-up": round(plain / fast, 1),
                     "C plain": chosen[False][0], "C span": chosen[True][0],
                     "cv plain": round(chosen[False][1], 3), "cv span": round(chosen[True][1], 3)})
        print(rows[-1], flush=True)
    print()
    print(markdown_table(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
