"""Does notebook 02's mirror check tell the data where a flip changes the label from the data where it does not?

On finished course runs (their split and notebook 01's backbone), run `helpers.lessons.mirror_check` with both
mirrors, as notebook 02 does on a CPU with the run's seed (a probe on about 400 training images as stored,
scored on the validation images as stored and mirrored); ``--split test`` scores on the (larger) test split
instead, for a sharper answer than the course can afford to look at.

    python benchmarks/mirror_check.py runs/byod-digits-seed0 runs/byod-photos_small-seed0 runs/byod-elpv_binary-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from helpers import lessons
from helpers.course import markdown_table
from helpers.data import ImageDataset, load_splits
from helpers.models import create_model
from helpers.runtime import tune_cpu
from helpers.transforms import eval_transform


def split_sets(run: Path, root: str, classes: list[str], transform) -> dict[str, ImageDataset]:
    """The run's train / val / test splits (notebook 02's CSVs), every image through ``transform``."""
    return {name: ImageDataset(root, frame[["file", "label"]], classes=classes, transform=transform)
            for name, frame in load_splits(run).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished course runs (notebooks 01 and 02 at least)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="the images the probe is scored on")
    parser.add_argument("--max-train", type=int, default=400, help="training images the probe is fitted on")
    args = parser.parse_args(argv)
    tune_cpu()
    rows = []
    for run in args.runs:
        for name in ("dataset.json", "decision.json"):
            if not (run / name).is_file():
                raise SystemExit(f"{run} has no {name}: run notebooks 01 and 02 there first")
        dataset = json.loads((run / "dataset.json").read_text())
        classes, backbone = dataset["classes"], json.loads((run / "decision.json").read_text())["backbone"]
        model = create_model(backbone, len(classes))
        # the course's preprocessing: ELPV cells keep the whole frame, photos get the backbone's crop
        transform = eval_transform(model, model.spec.input_size, 1.0 if dataset["elpv"] else None)
        sets = split_sets(run, dataset["root"], classes, transform)
        scored = sets[args.split]
        table = lessons.mirror_check(model, sets["train"], scored,
                                     list(lessons.MIRRORS), max_train=args.max_train, seed=dataset["seed"],
                                     device="cpu")
        table.insert(0, "images", len(scored))
        table.insert(0, "run", run.name)
        rows.append(table)
        print(markdown_table(table.round(3)), flush=True)
    print(markdown_table(pd.concat(rows).round(3)))
    print("command:", "python benchmarks/mirror_check.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
