"""The ELPV benchmark: fine-tune a backbone on the published 75 / 25 protocol, report test metrics.

Protocol (Deitsch et al. 2019): 25 % of the 2,624 cells held out for testing, stratified over
label x type; we take a further 15 % of the rest for validation (early stopping / best epoch).

    python benchmarks/elpv.py --task binary --seed 0            # one run, prints a JSON line
    python benchmarks/elpv.py --task 4class --seeds 0 1 2        # mean +- std over seeds

Each run writes runs/benchmarks/<task>_<strategy>_<size>px_seed<N>/ (checkpoints, history,
result.json). Results go into benchmarks/RESULTS.md by hand, with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from helpers.data import (ELPV_TASKS, ImageDataset, eval_transform, load_table, make_splits, prepare_elpv,
                          train_transform)
from helpers.freezing import STRATEGIES, apply_strategy
from helpers.models import create_model
from helpers.training import fit, make_loader, pick_device, seed_everything


def run(task: str, seed: int, backbone: str, strategy: str, n: int, image_size: int, epochs: int, lr: float,
        batch_size: int, augment: str, label_smoothing: float, layer_decay: float, out_root: Path,
        device: str | None, data_root: Path) -> dict:
    label_col, classes = ELPV_TASKS[task]
    root = prepare_elpv(data_root)
    table = load_table(root, root / "labels.csv", "file", label_col, "type")
    # The split is stratified on the 4-class label x type for both tasks (same test cells).
    strata = load_table(root, root / "labels.csv", "file", "label4", "type")
    splits = make_splits(strata, seed=seed)
    labels = dict(zip(table["file"], table["label"]))
    for part in splits.values():
        part["label"] = part["file"].map(labels)

    seed_everything(seed)
    model = apply_strategy(create_model(backbone, len(classes)), strategy, **({"n": n} if strategy in
                                                                               ("last_n", "initial", "truncate") else {}))
    ev = eval_transform(model, image_size, crop_pct=1.0)
    tr = train_transform(model, image_size, augment=augment, crop_pct=1.0)
    train = ImageDataset(root, splits["train"], group_col="group", classes=classes, transform=tr)
    val = ImageDataset(root, splits["val"], group_col="group", classes=classes, transform=ev)
    test = ImageDataset(root, splits["test"], group_col="group", classes=classes, transform=ev)

    out = out_root / f"{task}_{backbone}_{strategy}_{image_size}px_seed{seed}"
    started = time.perf_counter()
    history = fit(model, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  label_smoothing=label_smoothing, layer_decay=layer_decay, metric="macro_f1"
                  if task == "4class" else "accuracy", out_dir=out, device=device, meta={"crop_pct": 1.0,
                                                                                         "task": task})
    train_seconds = time.perf_counter() - started

    device_t = pick_device(device)
    model.eval().to(device_t)
    preds, targets = [], []
    with torch.inference_mode():
        for x, y in make_loader(test, 64, False, device_t):
            preds.append(model(x.to(device_t)).argmax(1).cpu())
            targets.append(y)
    preds, targets = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    result = {
        "task": task, "seed": seed, "backbone": backbone, "strategy": strategy, "n": n, "image_size": image_size,
        "epochs": epochs, "epochs_run": int(len(history)), "lr": lr, "augment": augment,
        "test_accuracy": float(accuracy_score(targets, preds)),
        "test_balanced_accuracy": float(balanced_accuracy_score(targets, preds)),
        "test_macro_f1": float(f1_score(targets, preds, average="macro")),
        "best_val": float(history.attrs["best_score"]), "train_seconds": round(train_seconds, 1),
        "device": str(device_t), "torch_threads": torch.get_num_threads(), "test_images": int(len(targets)),
    }
    if task == "4class":  # the binary reading of the same predictions (defective <=> p >= 0.5)
        result["binary_accuracy_from_4class"] = float(np.mean((preds >= 2) == (targets >= 2)))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(ELPV_TASKS), default="binary")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--strategy", choices=STRATEGIES, default="full")
    parser.add_argument("--n", type=int, default=2, help="groups for last_n / initial / truncate")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augment", default="cells", choices=["cells", "natural", "none"])
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--layer-decay", type=float, default=0.8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)

    results = []
    for seed in args.seeds:
        result = run(args.task, seed, args.backbone, args.strategy, args.n, args.image_size, args.epochs, args.lr,
                     args.batch_size, args.augment, args.label_smoothing, args.layer_decay, args.out, args.device,
                     args.data)
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) > 1:
        for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "train_seconds"):
            values = [r[key] for r in results]
            print(f"{key}: {statistics.mean(values):.4f} +- {statistics.stdev(values):.4f} "
                  f"over seeds {args.seeds}", flush=True)
    print("command:", "python benchmarks/elpv.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
