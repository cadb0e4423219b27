"""Frozen-prefix cache vs the usual loop: `head` on the full ELPV training split, both ways, one run.

The usual loop re-reads every image and re-runs the frozen backbone in every epoch; the cached
loop runs the backbone once and trains the classifier on the stored 1280-d features. Both use
the same model, data, seed and deterministic preprocessing, so they train the same function.

    python benchmarks/cache_speed.py                 # ELPV binary, 224 px
    python benchmarks/cache_speed.py --usual-epochs 1 --cached-epochs 30 --lr 3e-3

Prints seconds per epoch (medians) for each loop and their ratio, the one-off feature pass, and
the cached run's test accuracy and total time (feature pass included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from helpers.data import ImageDataset
from helpers.evaluation import compute_metrics, predict
from helpers.freezing import apply_strategy
from helpers.models import create_model
from helpers.runtime import seed_everything, tune_cpu
from helpers.training import fit
from helpers.transforms import eval_transform

from elpv import elpv_splits  # noqa: E402  (benchmarks/elpv.py, the same folder)


def elpv_sets(image_size: int, seed: int) -> dict[str, ImageDataset]:
    """The course's binary ELPV split, every image preprocessed deterministically at ``image_size``."""
    params, splits, classes = elpv_splits("binary", seed, "cpu")
    transform = eval_transform(create_model("efficientnet_lite0", 2, pretrained=False), image_size, crop_pct=1.0)
    return {name: ImageDataset(params.data_root, part, group_col="group", classes=classes, transform=transform)
            for name, part in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--usual-epochs", type=int, default=2)
    parser.add_argument("--cached-epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tune_cpu()
    sets = elpv_sets(args.image_size, args.seed)
    settings = dict(lr=args.lr, batch_size=64, seed=args.seed, warmup_epochs=0, progress=False)

    def head_model():
        seed_everything(args.seed)
        return apply_strategy(create_model("efficientnet_lite0", 2), "head")

    usual = fit(head_model(), sets["train"], sets["val"], epochs=args.usual_epochs, cache=False, **settings)

    started = time.perf_counter()
    model = head_model()
    cached = fit(model, sets["train"], sets["val"], epochs=args.cached_epochs, cache=True, **settings)
    cached_total = time.perf_counter() - started

    test = compute_metrics(predict(model, sets["test"], device="cpu"), sets["test"].classes)

    usual_epoch = statistics.median(usual["seconds"])
    cached_epoch = statistics.median(cached["seconds"])
    result = {
        "images_train": len(sets["train"]), "images_val": len(sets["val"]), "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
        "usual_seconds_per_epoch": round(usual_epoch, 3), "usual_epochs": args.usual_epochs,
        "cached_seconds_per_epoch": round(cached_epoch, 4), "cached_epochs": args.cached_epochs,
        "per_epoch_ratio": round(usual_epoch / cached_epoch, 1),
        "feature_pass_seconds": cached.attrs["cache_seconds"],
        "cached_total_seconds_incl_feature_pass": round(cached_total, 1),
        "cached_test_accuracy": round(test["accuracy"], 4),
        "cached_test_balanced_accuracy": round(test["balanced_accuracy"], 4),
        "cached_best_val_accuracy": round(float(cached.attrs["best_score"]), 4),
    }
    for key, value in result.items():
        print(f"{key:>42}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
