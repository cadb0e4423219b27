"""Bring your own data: the course's default run on datasets it was not tuned on, beside its baselines.

Each dataset runs the whole course (notebooks 01 -> 05, all defaults, only the data and the seed set
as parameters) for each seed, and one row records the final model's test accuracy and macro-F1
beside the majority class's and the linear probe's, which strategy the comparison chose, where the guide's pick
ranked, and the wall time. ELPV runs through the course's own data; the others are built offline by
`benchmarks/datasets.py` (class folders under data/byod/).

    python benchmarks/byod.py                                  # the default set, seeds 0 and 1
    python benchmarks/byod.py --datasets elpv_binary digits --seeds 0

Writes runs/byod/byod.csv and prints a markdown table (the rows of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from helpers.course import markdown_table, run_course
from helpers.files import write_csv
from helpers.runtime import tune_cpu
from helpers.selection import ties_with_best
from helpers.workbook import workbook_root

import datasets  # noqa: E402  (benchmarks/datasets.py, the same folder)

# name -> notebook parameters; "data" means: built by datasets.py into data/byod/<name>
ELPV = {"elpv_binary": {"task": "binary"}, "elpv_4class": {"task": "4class"}}
DEFAULT = ["elpv_binary", "elpv_4class", "elpv", "photos_small", "digits", "textures"]


def data_root(name: str) -> Path:
    """The class-folder dataset ``name`` (built once, seed 0, on first use)."""
    root = workbook_root() / "data" / "byod" / name
    if not root.is_dir():
        print(f"[byod] building {name} into {root}", flush=True)
        datasets.build(name, root, seed=0)
    return root


def run_name(name: str, seed: int) -> str:
    return f"byod-{name}-seed{seed}"


def one_run(name: str, seed: int) -> dict:
    """Run the course on dataset ``name`` with ``seed``; one row of results."""
    parameters = dict(ELPV[name]) if name in ELPV else {"data_root": str(data_root(name))}
    parameters["seed"] = seed
    started = time.perf_counter()
    run = run_course(run_name(name, seed), parameters, smoke=False, progress=False)
    return row(name, seed, run, time.perf_counter() - started)


def notebook_seconds(run: Path) -> float:
    """The wall time papermill recorded for each executed notebook in ``run``, summed."""
    total = 0.0
    for notebook in sorted(run.glob("0[1-5]_*.ipynb")):
        duration = json.loads(notebook.read_text())["metadata"]["papermill"].get("duration")
        if duration is None:
            raise SystemExit(f"{notebook} did not finish (papermill recorded no duration: an interrupted run?); "
                             f"rerun it with `python benchmarks/byod.py --datasets <name> --seeds <seed>`")
        total += duration
    return total


def collected_run(name: str, seed: int) -> dict:
    """The row of a finished earlier run (``--collect``): the time is the notebooks' own, without the
    runner's few seconds of start-up."""
    run = workbook_root() / "runs" / run_name(name, seed)
    if not (run / "metrics.json").is_file():
        raise SystemExit(f"{run} has no metrics.json: run `python benchmarks/byod.py --datasets {name} "
                         f"--seeds {seed}` first")
    return row(name, seed, run, notebook_seconds(run))


def guide_within_noise(strategy: dict) -> bool | None:
    """Whether the guide's pick tied with the best strategy in notebook 03's comparison (None: no comparison)."""
    if not strategy.get("comparison"):
        return None
    return strategy["recommended_by_guide"] in ties_with_best(pd.DataFrame(strategy["comparison"]))


def row(name: str, seed: int, run: Path, seconds: float) -> dict:
    """One row of results from the files the course wrote into ``run``."""
    metrics = json.loads((run / "metrics.json").read_text())
    strategy = json.loads((run / "strategy.json").read_text())
    decision = json.loads((run / "decision.json").read_text())
    final = json.loads((run / "final.json").read_text())
    return {"dataset": name, "seed": seed, "n_train": decision["n_train"], "classes": len(decision["classes"]),
            "similarity": decision["similarity"], "guide_pick": strategy["recommended_by_guide"],
            "guide_rank": f"{strategy['guide_rank']}/{strategy['candidates']}",
            "guide_within_noise": guide_within_noise(strategy), "chosen": strategy["strategy"],
            "final": final["model"], "augment": metrics.get("augment"), "test_accuracy": metrics["test_accuracy"],
            "probe": metrics["baseline_probe"], "majority": metrics["baseline_majority"],
            "final_minus_probe": metrics["test_accuracy"] - metrics["baseline_probe"],
            "macro_f1": metrics["test_macro_f1"],
            # runs from before these keys were written show None rather than a number they never measured
            "probe_macro_f1": metrics.get("baseline_probe_macro_f1"),
            "majority_macro_f1": metrics.get("baseline_majority_macro_f1"),
            "minutes": round(seconds / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT,
                        help=f"from {list(ELPV) + list(datasets.DATASETS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--collect", action="store_true",
                        help="do not run: rebuild the table from the runs/byod-* folders of earlier runs")
    args = parser.parse_args(argv)
    unknown = [d for d in args.datasets if d not in ELPV and d not in datasets.DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(ELPV) + list(datasets.DATASETS)}")
    if os.environ.get("TL_SMOKE", "0") == "1" and not args.collect:
        parser.error("TL_SMOKE=1 is set: the benchmark measures the real budget; unset it")
    tune_cpu()
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows.append(collected_run(name, seed) if args.collect else one_run(name, seed))
            print(json.dumps(rows[-1]), flush=True)
    frame = pd.DataFrame(rows)
    out = workbook_root() / "runs" / "byod"
    write_csv(frame, out / "byod.csv")
    print(markdown_table(frame))
    columns = ["test_accuracy", "probe", "final_minus_probe", "macro_f1", "probe_macro_f1", "minutes"]
    # to_numeric: a column of older runs' None is object-typed, and a mean over it must give NaN, not fail
    means = frame[columns].apply(pd.to_numeric).groupby(frame["dataset"]).mean()
    print(markdown_table(means.reset_index()))
    print("command:", "python benchmarks/byod.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
