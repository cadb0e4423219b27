"""Does moving the decision boundary on validation raise 4-class macro-F1? Per-class logit offsets, side by side.

Class-weighted training (``--class-weights balanced``) already trades accuracy for the rare classes; a second,
cheaper lever is to add an offset to each class's logit after training, chosen on the validation split to
maximize macro-F1 (coordinate ascent over a grid, the first class fixed at 0), then applied once to test.
Nothing is chosen on test. Per finished `benchmarks/elpv.py` run: validation and test macro-F1 without and with
the offsets, and the offsets themselves.

    python benchmarks/class_bias.py runs/benchmarks/4class_efficientnet_lite0_full_224px_30ep_balanced_seed0 ...

Logits are computed once per run (plain, one view per image) and kept in ``RUN_DIR/class_bias_logits.npz``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from helpers.checkpoint import checkpoint_preprocessing, model_from_checkpoint
from helpers.data import ImageDataset
from helpers.evaluation import predict
from helpers.metrics import score
from helpers.transforms import eval_transform

from elpv import elpv_splits  # noqa: E402  (benchmarks/elpv.py, the same folder)

GRID = np.round(np.linspace(-2.0, 2.0, 21), 2)  # offsets in logit units: up to e^2 ~ 7x in odds


def split_logits(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(logits, targets) of ``run_dir/best.pt`` on its validation and test splits."""
    stored = run_dir / "class_bias_logits.npz"
    if stored.is_file():
        z = np.load(stored)
        return {part: (z[f"{part}_logits"], z[f"{part}_targets"]) for part in ("val", "test")}
    result = json.loads((run_dir / "result.json").read_text())
    model, ckpt = model_from_checkpoint(run_dir / "best.pt")
    params, splits, classes = elpv_splits(result["task"], result["seed"], None)
    if list(ckpt["classes"]) != classes:
        raise ValueError(f"{run_dir / 'best.pt'} has classes {ckpt['classes']}, task {result['task']} has {classes}")
    transform = eval_transform(checkpoint_preprocessing(ckpt))
    out = {}
    for part in ("val", "test"):
        data = ImageDataset(params.data_root, splits[part], group_col="group", classes=classes, transform=transform)
        pred = predict(model, data)
        out[part] = (pred[[f"logit_{c}" for c in classes]].to_numpy(), pred["target"].to_numpy())
    np.savez(stored, **{f"{part}_{kind}": array for part, (logits, targets) in out.items()
                        for kind, array in (("logits", logits), ("targets", targets))})
    return out


def fit_offsets(logits: np.ndarray, targets: np.ndarray, metric: str, rounds: int = 3) -> tuple[np.ndarray, float]:
    """Per-class logit offsets that maximize ``metric`` on (``logits``, ``targets``); a change must improve it."""
    offsets = np.zeros(logits.shape[1])
    best = score(metric, targets, logits.argmax(1))
    for _ in range(rounds):
        for k in range(1, logits.shape[1]):
            for value in GRID:
                trial = offsets.copy()
                trial[k] = value
                trial_score = score(metric, targets, (logits + trial).argmax(1))
                if trial_score > best:
                    best, offsets = trial_score, trial
    return offsets, best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metric", default="macro_f1")
    args = parser.parse_args(argv)
    print("| run | val before | val after | test before | test after | offsets |")
    print("|---|---|---|---|---|---|")
    changes = []
    for run_dir in args.runs:
        parts = split_logits(run_dir)
        (val_logits, val_targets), (test_logits, test_targets) = parts["val"], parts["test"]
        offsets, val_after = fit_offsets(val_logits, val_targets, args.metric)
        before = score(args.metric, test_targets, test_logits.argmax(1))
        after = score(args.metric, test_targets, (test_logits + offsets).argmax(1))
        changes.append(after - before)
        print(f"| {run_dir.name} | {score(args.metric, val_targets, val_logits.argmax(1)):.3f} | {val_after:.3f} | "
              f"{before:.3f} | {after:.3f} | {' '.join(f'{o:+.1f}' for o in offsets)} |", flush=True)
    print(f"test {args.metric} change: mean {np.mean(changes):+.4f} over {len(changes)} run(s)")


if __name__ == "__main__":
    main()
