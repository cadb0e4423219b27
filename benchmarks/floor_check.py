"""What did the floor's tie rule cost? The model notebook 04 set aside, scored on test after the fact.

Notebook 04 keeps the strategy's model (``best.pt``) only when it beats the linear probe (``probe.pt``) on
validation by more than two standard errors; otherwise ``final.pt`` is the probe. This script scores both
checkpoints of finished course runs on their test split, so one can see whether the models the rule set aside
would have done better. It is a check of the rule, not a way to choose: nothing here feeds back into a run.

    python benchmarks/floor_check.py runs/byod-*-seed0 runs/byod-*-seed1

Per run: the validation evidence 04 decided on (from ``final.json``), which model it kept, and the test
accuracy (or the run's selection metric) of both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from helpers.checkpoint import checkpoint_preprocessing, model_from_checkpoint
from helpers.data import ImageDataset, load_splits
from helpers.evaluation import predict
from helpers.metrics import score
from helpers.transforms import eval_transform


def test_score(run_dir: Path, checkpoint: str, metric: str) -> float:
    """``metric`` of ``run_dir/checkpoint`` on the run's test split, with the checkpoint's own preprocessing."""
    dataset = json.loads((run_dir / "dataset.json").read_text())
    model, ckpt = model_from_checkpoint(run_dir / checkpoint)
    test = ImageDataset(Path(dataset["root"]), load_splits(run_dir)["test"], classes=list(ckpt["classes"]),
                        transform=eval_transform(checkpoint_preprocessing(ckpt)))
    pred = predict(model, test)
    return score(metric, pred["target"].to_numpy(), pred["predicted"].to_numpy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    print("| run | strategy | metric | val probe | val strategy | noise | kept | test probe | test strategy |")
    print("|---|---|---|---|---|---|---|---|---|")
    differences = []
    for run_dir in args.runs:
        final = json.loads((run_dir / "final.json").read_text())
        strategy = json.loads((run_dir / "strategy.json").read_text())["strategy"]
        if final["val_fine_tuned"] is None:  # the strategy was head: the probe is all there is
            print(f"| {run_dir.name} | {strategy} | {final['metric']} | {final['val_probe']:.3f} | – | – | probe "
                  f"| – | – |")
            continue
        probe, tuned = (test_score(run_dir, name, final["metric"]) for name in ("probe.pt", "best.pt"))
        differences.append(tuned - probe)
        print(f"| {run_dir.name} | {strategy} | {final['metric']} | {final['val_probe']:.3f} | "
              f"{final['val_fine_tuned']:.3f} | ±{final['noise']:.3f} | {final['model']} | {probe:.3f} | {tuned:.3f} |",
              flush=True)
    if differences:
        print(f"strategy minus probe on test: mean {np.mean(differences):+.4f}, "
              f"{sum(d > 0 for d in differences)} higher / {sum(d < 0 for d in differences)} lower "
              f"of {len(differences)} run(s)")


if __name__ == "__main__":
    main()
