"""Does `measure_similarity` put each kind of data on the right side of the guide?

Builds the datasets of `benchmarks/datasets.py` (once, under ``--root``), scores a random sample
of each with `helpers.freezing.measure_similarity` and the default probe, exactly as notebook 01
does (EfficientNet-Lite0 with its ImageNet head, its eval transform at 224 px), and prints one
Markdown row per dataset: images scored, their size, the score, the side, the side expected from
what the images are, and the old entropy score for comparison. Then the margins: how far the
closest dataset of each kind is from the threshold.

    python benchmarks/similarity.py                     # every dataset, seed 0, up to 160 images each
    python benchmarks/similarity.py --seeds 0 1 --n 120 # other crops and samples: is the margin stable?
    python benchmarks/similarity.py --guide             # also the guide's quadrant and pick (GUIDE.md)

If foolbox (requirements-dev.txt) is installed, its ImageNet validation JPEGs, CIFAR-10/100
thumbnails and MNIST / Fashion-MNIST digits are scored too, as reference rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import DATASETS, DatasetUnavailable, build  # noqa: E402

from helpers.data import make_splits, read_image, scan_class_folders  # noqa: E402
from helpers.freezing import (SIMILARITY_PROBE, SIMILARITY_THRESHOLD, SMALL_IMAGES_PER_CLASS,  # noqa: E402
                              measure_similarity, recommend)
from helpers.models import create_model  # noqa: E402
from helpers.transforms import eval_transform  # noqa: E402

# ELPV cells fill the frame: the course probes them uncropped (workbook.Params.crop_pct).
CROP_PCT = {"elpv": 1.0, "elpv4": 1.0}
# (name, file-name prefix in foolbox/data, expected side)
FOOLBOX_SETS = (("ref:imagenet", "imagenet_", True), ("ref:cifar", "cifar", True),
                ("ref:mnist", "mnist_", False), ("ref:fashionMNIST", "fashionMNIST_", None))


def foolbox_files(prefix: str) -> list[Path]:
    """Image files shipped in foolbox's wheel whose names start with ``prefix`` (none without foolbox)."""
    spec = importlib.util.find_spec("foolbox")  # find the data folder without importing foolbox
    if spec is None or spec.origin is None:
        return []
    return sorted((Path(spec.origin).parent / "data").glob(f"{prefix}*"))


def score_files(files: list[Path], model: torch.nn.Module, crop_pct: float | None, batch: int = 32) -> dict:
    """`measure_similarity` of ``files`` preprocessed as notebook 01 does, plus their median size."""
    transform = eval_transform(model, crop_pct=crop_pct)
    images = [torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in files]
    side = int(np.median([max(im.shape[1:]) for im in images]))
    batches = [torch.stack([transform(im) for im in images[i:i + batch]]) for i in range(0, len(images), batch)]
    result = measure_similarity([(b, None) for b in batches], model)  # any iterable of (images, labels)
    return result | {"median_side_px": side}


def sample(files: list[Path], n: int, seed: int) -> list[Path]:
    if len(files) <= n:
        return files
    picks = np.random.default_rng(seed).choice(len(files), n, replace=False)
    return [files[i] for i in sorted(picks)]


def side(similar: bool | None) -> str:
    return {True: "similar", False: "different", None: "either"}[similar]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "similarity",
                        help="where the datasets are built (reused if there: delete it after changing a builder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="dataset and sample seeds")
    parser.add_argument("--n", type=int, default=160, help="images scored per dataset (a random sample)")
    parser.add_argument("--datasets", nargs="+", default=[n for n in DATASETS if n != "elpv4"],
                        help="which datasets (elpv4 holds the same images as elpv, so it is left out)")
    parser.add_argument("--no-reference", action="store_true", help="skip foolbox's reference images")
    parser.add_argument("--guide", action="store_true",
                        help="also print each dataset's size, quadrant and the guide's pick (benchmarks/GUIDE.md)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = create_model(SIMILARITY_PROBE, None)

    rows = []
    jobs: list[tuple[str, int | None, list[Path], bool | None, float | None]] = []
    tables = {}
    for seed in args.seeds:
        for name in args.datasets:
            dest = args.root / f"{name}_seed{seed}"
            if not dest.is_dir():
                try:
                    build(name, dest, seed)
                except DatasetUnavailable as err:
                    print(f"{name}: skipped: {err}", file=sys.stderr)
                    continue
            table = scan_class_folders(dest)
            tables[(name, seed)] = table
            files = sample([dest / f for f in table["file"]], args.n, seed)
            jobs.append((name, seed, files, DATASETS[name].expected_similar, CROP_PCT.get(name)))
    if not args.no_reference:
        for name, prefix, expected in FOOLBOX_SETS:
            files = foolbox_files(prefix)
            if files:
                jobs.append((name, None, files, expected, None))
            else:
                print(f"{name}: skipped: foolbox is not installed (pip install -r requirements-dev.txt)",
                      file=sys.stderr)

    print(f"probe {SIMILARITY_PROBE} at {model.spec.input_size} px; threshold {SIMILARITY_THRESHOLD}\n")
    print("| dataset | seed | images | median px | distance | similarity | side | expected | agrees "
          "| entropy score (old) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, seed, files, expected, crop in jobs:
        started = time.perf_counter()
        result = score_files(files, model, crop)
        agrees = "" if expected is None else ("yes" if result["similar"] == expected else "**no**")
        rows.append((name, expected, result["similarity"], seed))
        print(f"| {name} | {'' if seed is None else seed} | {result['images']} | {result['median_side_px']} | "
              f"{result['activation_distance']:.3f} | {result['similarity']:.3f} | {side(result['similar'])} | "
              f"{side(expected)} | {agrees} | {result['entropy_similarity']:.3f} |", flush=True)
        print(f"  ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

    similar = [r[2] for r in rows if r[1] is True]
    different = [r[2] for r in rows if r[1] is False]
    if similar and different:
        low = min(rows, key=lambda r: r[2] if r[1] is True else np.inf)
        high = max(rows, key=lambda r: r[2] if r[1] is False else -np.inf)
        print(f"\nlowest 'similar' dataset: {low[0]} {low[2]:.3f} (margin {low[2] - SIMILARITY_THRESHOLD:+.3f}); "
              f"highest 'different' dataset: {high[0]} {high[2]:.3f} "
              f"(margin {SIMILARITY_THRESHOLD - high[2]:+.3f}); gap between them {low[2] - high[2]:+.3f}")
    wrong = [r[0] for r in rows if r[1] is not None and (r[2] >= SIMILARITY_THRESHOLD) != r[1]]
    print("all on the expected side" if not wrong else f"on the wrong side: {wrong}")
    if args.guide:
        print_guide(rows, tables)
    return 0


def print_guide(rows: list[tuple], tables: dict) -> None:
    """Size (the course's training split: 75 % train+val, of which 85 % train), similarity,
    quadrant and `recommend`'s pick per built dataset, as rows for benchmarks/GUIDE.md."""
    print("\n| dataset | seed | images | classes | train split | per class | size | similarity | side | "
          "quadrant | guide's pick |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, _, score, seed in rows:
        if (name, seed) not in tables:
            continue
        table = tables[(name, seed)]
        n_train = len(make_splits(table, label_col="label", group_col=None, seed=seed)["train"])
        n_classes = table["label"].nunique()
        small = n_train / n_classes < SMALL_IMAGES_PER_CLASS
        similar = score >= SIMILARITY_THRESHOLD
        strategy, _ = recommend(n_train, n_classes, score)
        print(f"| {name} | {seed} | {len(table)} | {n_classes} | {n_train} | {n_train / n_classes:.0f} | "
              f"{'small' if small else 'large'} | {score:.3f} | {side(similar)} | "
              f"{'small' if small else 'large'} & {side(similar)} | `{strategy}` |")


if __name__ == "__main__":
    sys.exit(main())
