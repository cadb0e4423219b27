"""Which CPU recipe beats the linear probe, and at what cost? One ELPV split, recipes side by side.

Each recipe starts from the probe (logistic regression on the frozen backbone's pooled features,
folded into the classifier) and fine-tunes the last groups on cached, augmented views of the
frozen prefix (the two-phase recipe). Numbers: validation and test accuracy of the best epoch,
wall time of each phase.

    python benchmarks/recipes.py                                   # defaults below
    python benchmarks/recipes.py --sizes 224 --groups 2 3 --views 2 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from helpers.data import ImageDataset
from helpers.evaluation import compute_metrics, predict
from helpers.freezing import apply_strategy
from helpers.models import create_model
from helpers.probe import fit_probe, install_probe, pooled_features
from helpers.runtime import seed_everything, tune_cpu
from helpers.training import fit
from helpers.transforms import eval_transform, train_transform

from elpv import elpv_splits  # noqa: E402  (benchmarks/elpv.py, the same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="binary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--views", type=int, nargs="+", default=[2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--augment", default="cells")
    args = parser.parse_args()
    tune_cpu()
    params, splits, classes = elpv_splits(args.task, args.seed, "cpu")
    for size in args.sizes:
        base = create_model("efficientnet_lite0", len(classes))
        ev = eval_transform(base, size, crop_pct=1.0)
        sets = {k: ImageDataset(params.data_root, v, group_col="group", classes=classes, transform=ev)
                for k, v in splits.items()}
        started = time.perf_counter()
        feats = {k: pooled_features(base, s, "cpu") for k, s in sets.items()}
        feature_seconds = time.perf_counter() - started
        started = time.perf_counter()
        probe = fit_probe(*feats["train"], seed=args.seed)
        probe_row = {"recipe": "probe", "size": size, "C": probe.C, "cv": probe.cv_accuracy,
                     "val": probe.accuracy(*feats["val"]), "test": probe.accuracy(*feats["test"]),
                     "seconds": round(feature_seconds + time.perf_counter() - started, 1)}
        print(json.dumps(probe_row), flush=True)
        for n in args.groups:
            for views in args.views:
                seed_everything(args.seed)
                model = apply_strategy(create_model("efficientnet_lite0", len(classes)), "last_n", n=n)
                install_probe(model, probe)
                tr = train_transform(model, size, augment=args.augment, crop_pct=1.0)
                train = ImageDataset(params.data_root, splits["train"], group_col="group", classes=classes,
                                     transform=tr)
                started = time.perf_counter()
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    history = fit(model, train, sets["val"], epochs=args.epochs, lr=args.lr, batch_size=32,
                                  cache=True, cache_views=views, layer_decay=0.8, label_smoothing=0.1,
                                  warmup_epochs=0.5, seed=args.seed, progress=False, device="cpu")
                seconds = time.perf_counter() - started
                test = compute_metrics(predict(model, sets["test"], device="cpu"), classes)
                print(json.dumps({"recipe": f"last_n n={n} views={views}", "size": size,
                                  "val": round(float(history["val_accuracy"].max()), 4),
                                  "best_epoch": int(np.argmax(history["val_accuracy"].to_numpy()) + 1),
                                  "test": round(test["accuracy"], 4),
                                  "cache_seconds": history.attrs["cache_seconds"],
                                  "seconds": round(seconds, 1),
                                  "val_curve": [round(v, 3) for v in history["val_accuracy"]]}), flush=True)


if __name__ == "__main__":
    main()
