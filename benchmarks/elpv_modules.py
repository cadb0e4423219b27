"""Do ELPV's test scores lean on cells from modules seen in training?

ELPV's 2,624 cells were cut from 44 solar modules, and the dataset does not say which cell came from
which. The file numbering suggests it: the cell types come in runs of consecutive numbers (60, 300, 180,
360, ... cells, multiples of a 60-cell module at first), and neighbouring cells agree on their label far
more often than random pairs do. The course (like Deitsch et al. 2019) splits ELPV cell by cell, so
cells of one module land in train and test alike. If a module's cells share their look and their defect
rate, the test score partly measures recognizing the module, and the per-image margin is too narrow.

This script measures both, with a *proxy* for the modules: blocks of 60 consecutive cells within each
run of one cell type (`helpers.data.elpv_blocks`, the `block` column of the course's ELPV table). For
each seed it splits ELPV the course's way (cell by cell, stratified on 4-class label x type) and by whole
blocks (`subject_col`, the course's option for data that names subjects), fits the course's probe
(logistic regression on EfficientNet-Lite0's pooled features at 224 px, C by 5-fold CV on train, by
blocks in the block split) and scores it once on test, beside the majority class, with the per-image
margin and the margin from resampling whole blocks. Nothing here feeds the course.

    python benchmarks/elpv_modules.py --seeds 0 1 2 3 4       # ~5 min alone: one feature pass, then the probes
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from helpers import workbook
from helpers.course import markdown_table
from helpers.lessons import neighbour_agreement
from helpers.data import ELPV_MODULE_CELLS, ImageDataset, elpv_blocks
from helpers.metrics import bootstrap_scores, score, subject_margin
from helpers.models import create_model
from helpers.probe import fit_probe, pooled_features
from helpers.runtime import tune_cpu
from helpers.transforms import eval_transform

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--task", default="binary", choices=["binary", "4class"])
    args = parser.parse_args(argv)
    tune_cpu()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        params = workbook.resolve_params({"run_name": run, "task": args.task}, smoke=False)
    table = workbook.label_table(params).reset_index(drop=True)
    table["block"] = elpv_blocks(table["group"])
    numbers = table["file"].str.extract(r"(\d+)")[0].astype(int)
    if not numbers.is_monotonic_increasing:
        raise SystemExit("the label table is not in file-number order; the blocks would mean nothing")

    labels = table["label"].to_numpy()
    agreement = neighbour_agreement(labels)
    rates = table.groupby("block")["label"].agg(lambda s: (s == s.mode()[0]).mean())
    defect = table.assign(d=table["label"] != workbook.classes_of(params, table)[0]).groupby("block")["d"].mean()
    print(f"{len(table)} cells, {table['block'].nunique()} blocks of up to {ELPV_MODULE_CELLS} consecutive cells "
          f"(runs of one type: {table.groupby((table['group'] != table['group'].shift()).cumsum()).size().tolist()})")
    print(f"consecutive cells share their {args.task} label {agreement['observed']:.3f} of the time; shuffled "
          f"labels {agreement['shuffled']:.3f} (97.5th percentile {agreement['shuffled_high']:.3f})")
    print(f"share of non-'{workbook.classes_of(params, table)[0]}' cells per block: min {defect.min():.2f}, "
          f"median {defect.median():.2f}, max {defect.max():.2f}, SD {defect.std():.2f}; "
          f"mean share of a block's commonest label {rates.mean():.2f}")

    classes = workbook.classes_of(params, table)
    model = create_model(params.backbone or "efficientnet_lite0", len(classes))
    everything = ImageDataset(params.data_root, table, classes=classes, transform=eval_transform(model))
    t0 = time.perf_counter()
    features, targets = pooled_features(model, everything, device="cpu")
    print(f"features of {len(table)} cells: {time.perf_counter() - t0:.0f} s", flush=True)
    metric = workbook.selection_metric(params)

    rows = []
    for seed in args.seeds:
        for split_name, subject in (("cell by cell (the course)", None), ("whole blocks", "block")):
            frame = table.drop(columns=["subject"], errors="ignore")
            if subject:
                frame = frame.assign(subject=frame[subject])
            splits = workbook.split_table(dataclasses.replace(params, seed=seed), frame, copies=[])
            index = {name: frame.index[frame["file"].isin(part["file"])].to_numpy() for name, part in splits.items()}
            train, test = index["train"], index["test"]
            probe = fit_probe(features[train], targets[train], metric=metric, seed=seed,
                              groups=table["block"].to_numpy()[train] if subject else None)
            predicted = probe.predict(features[test])
            blocks = table["block"].to_numpy()[test]
            per_image = float(2 * bootstrap_scores(metric, targets[test], [predicted], 1000, seed)[:, 0].std(ddof=1))
            shared = len(set(blocks) & set(table["block"].to_numpy()[train]))
            majority = np.bincount(targets[train]).argmax()
            rows.append({"seed": seed, "split": split_name, "test cells": len(test),
                         "test blocks": len(set(blocks)), "test blocks also in train": shared,
                         "first test blocks": ",".join(sorted(set(blocks))[:3]),
                         f"test '{classes[0]}' share": round(float((targets[test] == 0).mean()), 3),
                         f"majority {metric}": round(score(metric, targets[test], np.full(len(test), majority)), 3),
                         "C": probe.C, metric: round(score(metric, targets[test], predicted), 3),
                         "± per image": round(per_image, 3),
                         "± by block": round(subject_margin(metric, targets[test], predicted, blocks, seed=seed), 3)})
            print(rows[-1], flush=True)
    result = pd.DataFrame(rows)
    print()
    print(markdown_table(result))
    means = result.groupby("split", sort=False)[[f"majority {metric}", metric, "± per image",
                                                  "± by block"]].mean().round(3)
    print()
    print(markdown_table(means.reset_index()))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
