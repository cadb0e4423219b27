"""Can a richer probe beat the course's? Features from more layers, other poolings, flipped views, other sizes.

On a finished course run (its split, its ``probe.pt`` backbone and preprocessing), the frozen backbone's
features are extracted once per image size, for the image and its three mirror images, keeping every
stage's output pooled to a vector and three poolings of the last feature map. Then the probe
(`helpers.probe.fit_probe`, C by cross-validation on train, the run's metric) is fitted on each variant and
scored once on test. Nothing here is used by the course: it measures whether the course's plain probe
(average-pooled last layer, one view, the backbone's own size) leaves accuracy on the table.

    python benchmarks/probe_variants.py runs/byod-elpv_binary-seed0 --studies layers pooling
    python benchmarks/probe_variants.py runs/byod-digits-seed0 --studies sizes --sizes 64 128 224 320

Variants (``--studies``):
- layers: the pooled output of the last k stages concatenated to the usual features (Head2Toe's idea,
  Evci et al. 2022: data far from ImageNet may be better served by earlier layers);
- pooling: mean (the course), max, GeM (p = 3), mean + max of the last feature map; each fitted on one view,
  and on the image plus its mirror images (train on all four, average the probabilities at test);
- sizes: the usual probe at other image sizes (e.g. below and above the images' own resolution).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.checkpoint import model_from_checkpoint
from helpers.course import markdown_table
from helpers.data import ImageDataset
from helpers.metrics import score
from helpers.probe import fit_probe
from helpers.runtime import make_loader, to_device, tune_cpu
from helpers.transforms import Preprocessing, eval_transform

CPU = torch.device("cpu")
MIRRORS = {"image": lambda x: x, "hflip": lambda x: x.flip(-1), "vflip": lambda x: x.flip(-2),
           "hvflip": lambda x: x.flip(-1).flip(-2)}


def last_map_and_pool(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The head split into (layers before its global pooling, the pooling): only for heads that end in one."""
    head = model.groups["head"]
    if not isinstance(head, torch.nn.Sequential) or "pool" not in type(head[-1]).__name__.lower():
        raise ValueError(f"the {model.spec.name} head does not end in a global pooling layer ({type(head).__name__});"
                         f" the pooling study supports timm EfficientNet-style heads")
    return torch.nn.Sequential(*list(head)[:-1]), head[-1]


@torch.inference_mode()
def features(run: Path, split: str, model, preprocessing: Preprocessing, classes: list[str],
             mirrors: list[str]) -> tuple[dict, np.ndarray]:
    """{(mirror, name): array}: each stage's average-pooled output and poolings of the last map."""
    dataset = json.loads((run / "dataset.json").read_text())
    frame = pd.read_csv(run / f"{split}.csv", dtype=str, keep_default_na=False)
    data = ImageDataset(dataset["root"], frame, classes=classes, transform=eval_transform(preprocessing))
    before_pool, _ = last_map_and_pool(model)
    stages = [name for name in model.group_names if name.startswith("stage")]
    out: dict = {}
    targets = []
    for x, y in make_loader(data, 64, shuffle=False, device=CPU, seed=0):
        for mirror in mirrors:
            h = to_device(MIRRORS[mirror](x), CPU, True)
            h = model.groups["stem"](h)
            for name in stages:
                h = model.groups[name](h)
                out.setdefault((mirror, name), []).append(h.mean((2, 3)).numpy())
            last = before_pool(h)
            out.setdefault((mirror, "mean"), []).append(last.mean((2, 3)).numpy())
            out.setdefault((mirror, "max"), []).append(last.amax((2, 3)).numpy())
            out.setdefault((mirror, "gem"), []).append(last.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy())
        targets.append(y.numpy())
    return {key: np.concatenate(parts).astype(np.float64) for key, parts in out.items()}, np.concatenate(targets)


def fit_and_score(name: str, train: list[np.ndarray], y_train: np.ndarray, test: list[np.ndarray],
                  y_test: np.ndarray, metric: str, seed: int) -> dict:
    """Fit on the stacked training views; at test, average the probabilities over the test views."""
    probe = fit_probe(np.concatenate(train), np.tile(y_train, len(train)), seed=seed, metric=metric)
    predicted = np.mean([probe.pipeline.predict_proba(x) for x in test], axis=0).argmax(1)
    predicted = probe.pipeline.classes_[predicted]
    return {"variant": name, "features": train[0].shape[1], "C": probe.C,
            # with several views per image the folds mix views of one image: the CV score is optimistic
            "cv": round(probe.cv_score, 3) if probe.cv_score is not None and len(train) == 1 else None,
            **{m: round(score(m, y_test, predicted), 3) for m in ("accuracy", "balanced_accuracy", "macro_f1")}}


def study(run: Path, studies: list[str], sizes: list[int] | None) -> list[dict]:
    model, ckpt = model_from_checkpoint(run / "probe.pt")
    model.eval()
    metric = json.loads((run / "final.json").read_text()).get("metric", "accuracy") \
        if (run / "final.json").is_file() else "accuracy"
    seed = json.loads((run / "dataset.json").read_text()).get("seed", 0)
    native = Preprocessing.from_dict(ckpt["preprocessing"])
    rows = []
    for size in sizes or [native.image_size]:
        preprocessing = dataclasses.replace(native, image_size=size)
        mirrors = list(MIRRORS) if "pooling" in studies else ["image"]
        started = time.perf_counter()
        train, y_train = features(run, "train", model, preprocessing, ckpt["classes"], mirrors)
        test, y_test = features(run, "test", model, preprocessing, ckpt["classes"], mirrors)
        print(f"[{run.name}] {size} px: features in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

        variants = [("mean pooling (the course's probe)", ["mean"], ("image",))]
        if "layers" in studies:
            stages = [name for name in model.group_names if name.startswith("stage")]
            variants += [(f"+ last {k} stage(s), average-pooled", ["mean", *stages[-k:]], ("image",))
                         for k in sorted({1, 2, 3, len(stages)})]
        if "pooling" in studies:
            variants += [(" + ".join(keys) + " pooling", keys, ("image",))
                         for keys in (["max"], ["gem"], ["mean", "max"])]
            variants += [(" + ".join(keys) + " pooling, 4 mirror views", keys, tuple(MIRRORS))
                         for keys in (["mean"], ["max"], ["gem"], ["mean", "max"])]
        for name, keys, views in variants:
            row = fit_and_score(name, [np.concatenate([train[(v, k)] for k in keys], 1) for v in views], y_train,
                                [np.concatenate([test[(v, k)] for k in keys], 1) for v in views], y_test, metric, seed)
            rows.append({"run": run.name, "size": size, "metric": metric, **row})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished course runs (with probe.pt and the split)")
    parser.add_argument("--studies", nargs="+", choices=["layers", "pooling", "sizes"], default=["layers", "pooling"])
    parser.add_argument("--sizes", nargs="+", type=int, help="image sizes for the sizes study (default: the run's)")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "probe.pt").is_file()]
    if missing:
        parser.error(f"no probe.pt in {missing}: run the course (notebooks 01-04) there first")
    if "sizes" in args.studies and not args.sizes:
        parser.error("--studies sizes needs --sizes, e.g. --sizes 128 224 320")
    tune_cpu()
    frame = pd.DataFrame([row for run in args.runs for row in study(run, args.studies, args.sizes)])
    print(markdown_table(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
