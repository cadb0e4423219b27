"""The ELPV benchmark: fine-tune a backbone on the published 75 / 25 protocol, report test metrics.

Protocol (Deitsch et al. 2019): 25 % of the 2,624 cells held out for testing, stratified over
label x type; we take a further 15 % of the rest for validation (early stopping / best epoch).

    python benchmarks/elpv.py --task binary --seed 0            # one run, prints a JSON line
    python benchmarks/elpv.py --task 4class --seeds 0 1 2        # mean +- std over seeds
    python benchmarks/elpv.py --evaluate runs/benchmarks/<run>    # re-score a finished run's best.pt

Test metrics are reported twice: plain (one view per cell) and with flip test-time augmentation
(`predict(..., tta="hvflip")`: the softmax averaged over the cell and its two mirror images). The
plain figure is the headline; TTA is a separate, clearly named column.

Each run writes runs/benchmarks/<task>_<backbone>_<strategy>_<size>px_<epochs>ep[_ema][_balanced][_lpft]_seed<N>/
(checkpoints, history, result.json) and refuses a folder that already holds a run unless --overwrite.
Results go into benchmarks/RESULTS.md by hand, with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers import workbook
from helpers.checkpoint import checkpoint_preprocessing, model_from_checkpoint
from helpers.data import ELPV_TASKS, ImageDataset
from helpers.evaluation import compute_metrics, predict
from helpers.files import write_json
from helpers.freezing import STRATEGIES, apply_strategy
from helpers.models import create_model
from helpers.probe import fit_probe, install_probe, pooled_features
from helpers.runtime import pick_device, seed_everything, tune_cpu
from helpers.training import fit
from helpers.transforms import AUGMENTATIONS, TTA_FLIPS, eval_transform, train_transform


def elpv_splits(task: str, seed: int, device: str | None) -> tuple[workbook.Params, dict, list[str]]:
    """The course's own train / val / test split of ELPV for ``task`` and ``seed`` (notebook 02's):
    stratified on the 4 expert classes x cell type, so both tasks test on the same cells."""
    params = workbook.resolve_params({"task": task, "seed": seed, "run_name": "benchmarks",
                                      "device": device or "auto"}, smoke=False)
    table = workbook.label_table(params)
    splits = workbook.split_table(params, table)
    for part in splits.values():  # the annotators' defect probability, for the breakdown of errors
        part["probability"] = part["stratum"].astype(float)
    return params, splits, workbook.classes_of(params, table)


def score_test_split(model: torch.nn.Module, test: ImageDataset, probability: pd.Series, task: str,
                     device: str | None) -> dict:
    """Test metrics without and with flip TTA (keys ``test_*`` and ``tta_test_*``), from
    `helpers.evaluation.compute_metrics` (the definitions notebook 05 reports).

    ``probability`` maps each test file to its annotated defect probability, for the breakdown
    of accuracy by cell.
    """
    result = {}
    classes = list(test.classes)
    for prefix, tta in (("test_", None), ("tta_test_", TTA_FLIPS["cells"])):
        pred = predict(model, test, device=device, tta=tta)
        metrics = compute_metrics(pred, classes)
        targets, preds = pred["target"].to_numpy(), pred["predicted"].to_numpy()
        # Where the errors are: accuracy per annotated defect probability and cell type.
        cells = pred.assign(correct=targets == preds, p=pred["file"].map(probability).to_numpy())
        result[prefix + "accuracy_by_cell"] = {
            f"p={p:.2f} {group}": f"{int(c.sum())}/{len(c)}"
            for (p, group), c in cells.groupby(["p", "group"])["correct"]}
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            result[prefix + key] = metrics[key]
        if task == "4class":  # the binary reading of the same predictions (defective <=> p >= 0.5)
            result[prefix.replace("test_", "") + "binary_accuracy_from_4class"] = float(
                np.mean((preds >= 2) == (targets >= 2)))
    result["test_images"] = int(len(test))
    return result


def run_folder(out_root: Path, name: str, overwrite: bool) -> Path:
    """``out_root / name``, refusing to train into a folder that already holds a run unless ``overwrite``: a
    finished run's checkpoints and result.json are the evidence behind a row of RESULTS.md."""
    out = out_root / name
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(f"{out} already holds a run ({', '.join(held[:6])}{', ...' if len(held) > 6 else ''}): "
                              f"pass --overwrite to replace it, or --out another folder")
    return out


def run(task: str, seed: int, backbone: str, strategy: str, n: int, image_size: int, epochs: int, lr: float,
        batch_size: int, augment: str, label_smoothing: float, layer_decay: float, ema_decay: float | None,
        out_root: Path, device: str | None, class_weights: str | None = None, from_probe: bool = False,
        overwrite: bool = False) -> dict:
    tags = "".join(tag for tag, on in (("_ema", ema_decay), ("_balanced", class_weights), ("_lpft", from_probe)) if on)
    out = run_folder(out_root, f"{task}_{backbone}_{strategy}_{image_size}px_{epochs}ep{tags}_seed{seed}", overwrite)
    params, splits, classes = elpv_splits(task, seed, device)
    root = params.data_root

    seed_everything(seed)
    options = {"n": n} if strategy in ("last_n", "initial", "truncate") else {}
    model = apply_strategy(create_model(backbone, len(classes)), strategy, **options)
    ev = eval_transform(model, image_size, crop_pct=1.0)
    tr = train_transform(model, image_size, augment=augment, crop_pct=1.0)
    train = ImageDataset(root, splits["train"], group_col="group", classes=classes, transform=tr)
    val = ImageDataset(root, splits["val"], group_col="group", classes=classes, transform=ev)
    test = ImageDataset(root, splits["test"], group_col="group", classes=classes, transform=ev)

    metric = "macro_f1" if task == "4class" else "accuracy"
    started = time.perf_counter()
    probe_C = None
    if from_probe:  # the two-phase recipe: the head starts as the linear probe on the frozen features
        plain_train = ImageDataset(root, splits["train"], group_col="group", classes=classes, transform=ev)
        probe = fit_probe(*pooled_features(model, plain_train, device), seed=seed, metric=metric)
        install_probe(model, probe)
        probe_C = probe.C
    history = fit(model, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  label_smoothing=label_smoothing, layer_decay=layer_decay, ema_decay=ema_decay,
                  class_weights=class_weights, metric=metric, out_dir=out, device=device, meta={"task": task},
                  # The probe was fitted on inference-mode features. With BatchNorm on batch statistics its
                  # head would see other features (1 epoch at 64 px: training loss 5.6, against 0.60 with it frozen).
                  freeze_batchnorm=from_probe)
    train_seconds = time.perf_counter() - started

    result = {
        "task": task, "seed": seed, "backbone": backbone, "strategy": strategy, "n": n, "image_size": image_size,
        "epochs": epochs, "epochs_run": int(len(history)), "lr": lr, "augment": augment,
        "label_smoothing": label_smoothing, "layer_decay": layer_decay, "batch_size": batch_size,
        "ema_decay": ema_decay, "class_weights": class_weights, "from_probe": from_probe, "probe_C": probe_C,
        # The model holds the best epoch's weights (fit's restore_best).
        **score_test_split(model, test, splits["test"].set_index("file")["probability"], task, device),
        "best_val": float(history.attrs["best_score"]), "train_seconds": round(train_seconds, 1),
        "device": str(pick_device(device)), "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "result.json", result)
    return result


def evaluate(run_dir: Path, device: str | None) -> dict:
    """Re-score ``run_dir/best.pt`` on its test split; update and return its result.json."""
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        raise FileNotFoundError(f"{result_path} not found: --evaluate needs a folder written by this script")
    result = json.loads(result_path.read_text())
    model, ckpt = model_from_checkpoint(run_dir / "best.pt")
    params, splits, classes = elpv_splits(result["task"], result["seed"], device)
    if list(ckpt["classes"]) != classes:
        raise ValueError(f"{run_dir / 'best.pt'} has classes {ckpt['classes']}, task {result['task']} has {classes}")
    ev = eval_transform(checkpoint_preprocessing(ckpt))
    test = ImageDataset(params.data_root, splits["test"], group_col="group", classes=classes, transform=ev)
    result.update(score_test_split(model, test, splits["test"].set_index("file")["probability"], result["task"],
                                   device))
    write_json(result_path, result)
    return result


# What makes two runs the same recipe (everything in result.json but the seed and the measurements).
RECIPE_KEYS = ("task", "backbone", "strategy", "n", "image_size", "epochs", "lr", "augment", "label_smoothing",
               "layer_decay", "batch_size", "ema_decay", "class_weights", "from_probe")


def read_result(run_dir: Path) -> dict:
    path = run_dir / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --summarize needs folders written by this script")
    return json.loads(path.read_text())


def summarize(results: list[dict]) -> None:
    """Print mean +- standard deviation over runs (the seeds of one recipe)."""
    recipes = {json.dumps({k: r.get(k) for k in RECIPE_KEYS}, sort_keys=True) for r in results}
    if len(recipes) > 1:
        raise ValueError(f"these runs used different recipes, so their mean means nothing: {sorted(recipes)}")
    seeds = [r["seed"] for r in results]
    for key in ("test_accuracy", "tta_test_accuracy", "test_balanced_accuracy", "test_macro_f1", "train_seconds"):
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{key}: {statistics.mean(values):.4f} +- {spread:.4f} over seeds {seeds}", flush=True)



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
    parser.add_argument("--augment", default="cells", choices=list(AUGMENTATIONS))
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--layer-decay", type=float, default=0.8)
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="validate and keep an EMA of the weights (e.g. 0.998); the raw model's val scores "
                             "are kept in history.csv as raw_val_*")
    parser.add_argument("--class-weights", choices=["balanced"], default=None,
                        help="weigh the loss by inverse class frequency (what the course does for macro-F1)")
    parser.add_argument("--from-probe", action="store_true",
                        help="two-phase recipe: start the head from the linear probe, then fine-tune "
                             "(BatchNorm kept on its stored statistics, which the probe was fitted on)")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="RUN_DIR",
                        help="mean +- std of finished runs' result.json (e.g. one per seed), train nothing")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--overwrite", action="store_true", help="train into a run folder that already holds a run")
    parser.add_argument("--evaluate", type=Path, metavar="RUN_DIR", help="re-score a finished run, train nothing")
    args = parser.parse_args(argv)
    tune_cpu()
    if args.evaluate is not None:
        print(json.dumps(evaluate(args.evaluate, args.device)), flush=True)
        return
    if args.summarize is not None:
        summarize([read_result(run_dir) for run_dir in args.summarize])
        return
    results = []
    for seed in args.seeds:
        result = run(args.task, seed, args.backbone, args.strategy, args.n, args.image_size, args.epochs, args.lr,
                     args.batch_size, args.augment, args.label_smoothing, args.layer_decay, args.ema_decay,
                     args.out, args.device, args.class_weights, args.from_probe, args.overwrite)
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) > 1:
        summarize(results)
    print("command:", "python benchmarks/elpv.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
