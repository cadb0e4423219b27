"""Which probe for which metric: the linear probe fitted for accuracy or for macro-F1, side by side.

On a finished course run (its split and its ``probe.pt`` backbone and preprocessing), extract the frozen
features of the train and test splits once, then fit the probe four ways (C chosen by accuracy or by
macro-F1; classes weighted equally or by inverse frequency) and score each on test. This is how the
course's choice (`helpers.probe.fit_probe`: for macro-F1, balanced weights and C by macro-F1) was measured.

    python benchmarks/probe_metric.py runs/byod-elpv_4class-seed0 runs/byod-elpv_4class-seed1
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from helpers.checkpoint import model_from_checkpoint
from helpers.course import markdown_table
from helpers.data import ImageDataset
from helpers.metrics import score
from helpers.probe import C_GRID, pooled_features
from helpers.runtime import tune_cpu
from helpers.transforms import Preprocessing, eval_transform

VARIANTS = [("accuracy", None), ("f1_macro", None), ("accuracy", "balanced"), ("f1_macro", "balanced")]


def split_features(run: Path, split: str, model, preprocessing, classes: list[str]):
    dataset = json.loads((run / "dataset.json").read_text())
    frame = pd.read_csv(run / f"{split}.csv", dtype=str, keep_default_na=False)
    transform = eval_transform(Preprocessing.from_dict(preprocessing))
    data = ImageDataset(dataset["root"], frame, classes=classes, transform=transform)
    return pooled_features(model, data, "cpu")


def compare(run: Path) -> list[dict]:
    model, ckpt = model_from_checkpoint(run / "probe.pt")
    x_train, y_train = split_features(run, "train", model, ckpt["preprocessing"], ckpt["classes"])
    x_test, y_test = split_features(run, "test", model, ckpt["preprocessing"], ckpt["classes"])
    rows = []
    for scoring, class_weight in VARIANTS:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight=class_weight))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            search = GridSearchCV(pipeline, {"logisticregression__C": list(C_GRID)}, scoring=scoring,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=0)).fit(x_train, y_train)
        predicted = search.predict(x_test)
        rows.append({"run": run.name, "C chosen by": scoring, "class weights": class_weight or "equal",
                     "C": search.best_params_["logisticregression__C"],
                     **{metric: round(score(metric, y_test, predicted), 3)
                        for metric in ("accuracy", "balanced_accuracy", "macro_f1")}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished course runs (with probe.pt and the split)")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "probe.pt").is_file()]
    if missing:
        parser.error(f"no probe.pt in {missing}: run the course (notebooks 01-04) there first")
    tune_cpu()
    frame = pd.DataFrame([row for run in args.runs for row in compare(run)])
    print(markdown_table(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
