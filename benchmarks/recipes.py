"""Which phase-2 recipe beats the linear probe on a CPU, and at what cost? One split, recipes side by side.

Phase 1 is the probe (logistic regression on the frozen backbone's pooled features, folded into
the classifier). Phase 2 fine-tunes the last ``n`` groups on cached outputs of the frozen prefix
(augmented views for training, plain ones for validation and test), computed once per ``n`` and
shared by every learning rate and BatchNorm setting, so the recipes differ only in what they set.
Per recipe: validation accuracy per epoch, and test accuracy at the best validation epoch and at the last.

    python benchmarks/recipes.py                          # ELPV binary, seed 0, the defaults below
    python benchmarks/recipes.py --groups 2 3 --lrs 2e-4 5e-4 --views 2 --epochs 8
    python benchmarks/recipes.py --groups 2 --lrs 1e-4 3e-4 --sgd-lrs --phase1 plain augmented

``--phase1 augmented`` fits phase 1 on the pooled features of the cached augmented views that phase 2 trains on
(each image's views kept in one cross-validation fold) instead of on the plain images, so phase 2 starts from a
classifier fitted to its own inputs; ``plain`` is the course's probe.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from helpers import cache
from helpers.data import ImageDataset
from helpers.freezing import apply_strategy
from helpers.models import create_model
from helpers.probe import fit_probe, install_probe, pooled_features
from helpers.runtime import make_loader, seed_everything, tune_cpu
from helpers.training import TrainConfig, evaluate, make_criterion, make_optimizer, make_scheduler, train_one_epoch
from helpers.transforms import eval_transform, train_transform

from elpv import elpv_splits  # noqa: E402  (benchmarks/elpv.py, the same folder)

CPU = torch.device("cpu")


def run_recipe(model, cached, config: TrainConfig, train_targets) -> dict:
    """Phase 2 on cached tensors: the per-epoch validation accuracy and the test accuracy of the best epoch."""
    seed_everything(config.seed)
    model.freeze_batchnorm = config.freeze_batchnorm
    net = model.tail(cached["prefix"])
    steps = int(np.ceil(len(cached["views"][0][0]) / config.batch_size))
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    criterion = make_criterion(config, model, type("T", (), {"targets": train_targets})(), CPU)
    plain = torch.nn.CrossEntropyLoss()
    val_curve, best, last_test = [], (-1.0, None), None
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        seed_everything(config.seed * 1000 + epoch)
        x, y = cached["views"][(epoch - 1) % len(cached["views"])]
        loader = make_loader(TensorDataset(x, y), config.batch_size, True, CPU, seed=config.seed * 1000 + epoch,
                             num_workers=0)
        train_one_epoch(net, loader, optimizer, criterion, CPU, scheduler=scheduler)
        scores = {}
        for split in ("val", "test"):
            result = evaluate(net, make_loader(TensorDataset(*cached[split]), 128, False, CPU, num_workers=0),
                              plain, CPU)
            scores[split] = float((result["targets"] == result["predictions"]).mean())
        val_curve.append(round(scores["val"], 3))
        last_test = scores["test"]
        if scores["val"] > best[0]:
            best = (scores["val"], scores["test"], epoch)
    model.freeze_batchnorm = False
    return {"val": best[0], "test": best[1], "best_epoch": best[2], "last_test": last_test, "val_curve": val_curve,
            "train_seconds": round(time.perf_counter() - started, 1)}


@torch.inference_mode()
def _pooled(model, x: torch.Tensor, prefix: int) -> np.ndarray:
    """The pooled features (the classifier's input) of cached prefix outputs ``x``, through the frozen rest."""
    model.eval()
    stop = len(model.group_names) - 1
    return torch.cat([model.forward_groups(x[i:i + 128], prefix, stop) for i in range(0, len(x), 128)]).numpy()


def augmented_probe(model, cached: dict, seed: int):
    """Phase 1 fitted on the cached augmented views phase 2 trains on; an image's views share a CV fold."""
    features = np.concatenate([_pooled(model, x, cached["prefix"]) for x, _ in cached["views"]]).astype(np.float64)
    targets = np.concatenate([y.numpy() for _, y in cached["views"]])
    images = len(cached["views"][0][1])
    return fit_probe(features, targets, seed=seed, groups=np.tile(np.arange(images), len(cached["views"])))


def cached_accuracy(model, cached: dict, split: str) -> float:
    """Accuracy of ``model`` (its tail after the cached prefix) on the cached ``split``."""
    result = evaluate(model.tail(cached["prefix"]), make_loader(TensorDataset(*cached[split]), 128, False, CPU,
                                                                num_workers=0), torch.nn.CrossEntropyLoss(), CPU)
    return float((result["targets"] == result["predictions"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="binary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    parser.add_argument("--sgd-lrs", type=float, nargs="*", default=[1e-3, 1e-2])
    parser.add_argument("--batchnorm", choices=["frozen", "train", "both"], default="frozen")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--augment", default="cells")
    parser.add_argument("--phase1", nargs="+", choices=["plain", "augmented"], default=["plain"],
                        help="what phase 1's classifier is fitted on: the plain images (the probe) or the cached "
                             "augmented views")
    args = parser.parse_args()
    tune_cpu()
    params, splits, classes = elpv_splits(args.task, args.seed, "cpu")
    base = create_model("efficientnet_lite0", len(classes))
    plain = eval_transform(base, args.size, crop_pct=1.0)
    sets = {k: ImageDataset(params.data_root, v, group_col="group", classes=classes, transform=plain)
            for k, v in splits.items()}
    started = time.perf_counter()
    train_features = pooled_features(base, sets["train"], CPU)
    probe = fit_probe(*train_features, seed=args.seed)
    seconds = time.perf_counter() - started
    for split in ("val", "test"):
        print(json.dumps({"recipe": "probe", "split": split, "C": probe.C,
                          "accuracy": round(probe.accuracy(*pooled_features(base, sets[split], CPU)), 4),
                          "phase1_seconds": round(seconds, 1)}), flush=True)
    augmented = ImageDataset(params.data_root, splits["train"], group_col="group", classes=classes,
                             transform=train_transform(base, args.size, augment=args.augment, crop_pct=1.0))
    for n in args.groups:
        seed_everything(args.seed)
        model = install_probe(apply_strategy(create_model("efficientnet_lite0", len(classes)), "last_n", n=n), probe)
        prefix = len(model.group_names) - 1 - n
        started = time.perf_counter()
        built = cache.build(model, augmented, sets["val"], prefix, args.views, seed=args.seed, batch_size=32,
                            device=CPU, dtype=None, channels_last=True, num_workers=None, progress=False)
        test = cache.extract_features(model, sets["test"], prefix, CPU, 64, None, "test", False)
        cached = {"prefix": prefix, "views": built.train_views, "val": built.val, "test": test}
        cache_seconds = round(time.perf_counter() - started, 1)
        pretrained = copy.deepcopy(model.state_dict())  # every phase-1 choice starts from the untouched groups
        for phase1 in args.phase1:
            model.load_state_dict(pretrained)
            if phase1 == "augmented":
                install_probe(model, augmented_probe(model, cached, args.seed))
                print(json.dumps({"recipe": "phase 1 only", "phase1": phase1, "n": n,
                                  **{split: round(cached_accuracy(model, cached, split), 4)
                                     for split in ("val", "test")}}), flush=True)
            else:
                install_probe(model, probe)
            start = copy.deepcopy(model.state_dict())
            batchnorm = {"frozen": [True], "train": [False], "both": [True, False]}[args.batchnorm]
            for optimizer, lr in [("adamw", lr) for lr in args.lrs] + [("sgd", lr) for lr in args.sgd_lrs]:
                for frozen_bn in batchnorm:
                    model.load_state_dict(start)
                    config = TrainConfig(epochs=args.epochs, lr=lr, batch_size=32, optimizer=optimizer,
                                         layer_decay=0.8, label_smoothing=0.1, warmup_epochs=0.5, seed=args.seed,
                                         freeze_batchnorm=frozen_bn)
                    result = run_recipe(model, cached, config,
                                        splits["train"]["label"].map(classes.index).to_numpy())
                    print(json.dumps({"recipe": f"last_n n={n}", "phase1": phase1, "optimizer": optimizer,
                                      "lr": lr, "freeze_batchnorm": frozen_bn, "views": args.views,
                                      "cache_seconds": cache_seconds, **result}), flush=True)


if __name__ == "__main__":
    main()
