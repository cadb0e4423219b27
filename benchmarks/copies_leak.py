"""What byte-identical copies do to a cross-validated score when the folds ignore them.

A folder where every picture is stored twice (a download run twice) is split the course's way: each picture's
copies land in one split (`helpers.data.make_splits` with `identical_files`). Inside the training split the
copies are still side by side, so cross-validation on it (the probe's choice of C, notebook 01's probe score,
notebook 03's folds) can fit on one copy and score on the other. This script fits the course's probe
(`helpers.probe.fit_probe`: logistic regression on EfficientNet-Lite0's pooled features at 224 px, C by 5-fold
CV on train + validation) with plain folds and with folds that keep copies together (`helpers.data.fold_units`),
and scores both once on test, beside the same folder without the second copies. A cross-validated score far
above test is the leak; the grouped one should sit near test, as the plain one does without copies.

    python benchmarks/copies_leak.py --seeds 0 1        # ~1 min on 2 cores: digits, 300 pictures, 600 files
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/datasets.py

from datasets import build_digits  # noqa: E402

from helpers.course import markdown_table  # noqa: E402
from helpers.data import ImageDataset, fold_units, identical_files, load_table, make_splits  # noqa: E402
from helpers.models import create_model  # noqa: E402
from helpers.probe import fit_probe, pooled_features  # noqa: E402
from helpers.runtime import tune_cpu  # noqa: E402
from helpers.transforms import eval_transform  # noqa: E402


def store_twice(root: Path) -> None:
    """Save every image again under a second name in its class folder, byte for byte."""
    for path in sorted(root.rglob("*.png")):
        shutil.copyfile(path, path.with_name(f"again_{path.name}"))


def features_of(root: Path, frame: pd.DataFrame, classes: list[str], model) -> tuple[np.ndarray, np.ndarray]:
    data = ImageDataset(root, frame[["file", "label"]], classes=classes, transform=eval_transform(model, 224))
    return pooled_features(model, data, "cpu")


def measure(root: Path, data: str, seed: int, model) -> list[dict]:
    table = load_table(root)
    classes = sorted(table["label"].unique())
    copies = identical_files(root, table["file"].tolist())
    splits = make_splits(table, group_col=None, seed=seed, copies=copies)
    pool = pd.concat([splits["train"], splits["val"]], ignore_index=True)
    x, y = features_of(root, pool, classes, model)
    x_test, y_test = features_of(root, splits["test"], classes, model)
    units = fold_units(root, pool)
    rows = []
    for folds, groups in (("plain", None), ("copies together", units)):
        if folds != "plain" and groups is None:
            continue  # no copies: the grouped folds are the plain ones
        probe = fit_probe(x, y, seed=seed, groups=groups)
        rows.append({"data": data, "seed": seed, "files (train + val)": len(pool),
                     "pictures": len(set(units)) if units is not None else len(pool), "folds": folds,
                     "C": probe.C, "cv accuracy": round(probe.cv_score, 3),
                     "test accuracy": round(float((probe.predict(x_test) == y_test).mean()), 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    tune_cpu()
    model = create_model("efficientnet_lite0", 2)  # only its frozen layers are used
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        once, twice = Path(tmp) / "once", Path(tmp) / "twice"
        build_digits(once, np.random.default_rng(0))
        shutil.copytree(once, twice)
        store_twice(twice)
        for seed in args.seeds:
            rows += measure(once, "every picture once", seed, model)
            rows += measure(twice, "every picture twice", seed, model)
    print(markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
