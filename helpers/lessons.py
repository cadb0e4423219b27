"""The small experiments and figures the notebooks show, kept out of the notebooks.

Each function answers one question a lesson asks (which backbone? how ImageNet-like is the
data? what does each freezing strategy train? does BatchNorm drift?) and returns a table or
a matplotlib figure, so the notebook cell is one line and the explanation sits around it.
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import ImageDataset
from .transforms import eval_transform
from .freezing import STRATEGIES, apply_strategy, trainable_summary
from .models import TransferModel, create_model, offline_backbones

# ----------------------------------------------------------------------------------------
# 01: the guide, backbones, similarity, linear probe

GUIDE = {  # (small, similar) -> the article's advice and our strategy name
    (True, True): ("fine-tune the last layers", "head / last_n"),
    (True, False): ("fine-tune the initial layers", "initial / truncate"),
    (False, True): ("fine-tune the last layers\nor the entire network", "last_n / full"),
    (False, False): ("retrain from the\ntrained model's checkpoint", "full"),
}


def plot_guide(small: bool | None = None, similar: bool | None = None, label: str = "this dataset") -> plt.Figure:
    """The article's size x similarity guide as a 2 x 2 grid, with ``label`` in the matching cell."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for (is_small, is_similar), (advice, strategy) in GUIDE.items():
        col, row = (0 if is_similar else 1), (1 if is_small else 0)
        here = small is is_small and similar is is_similar
        ax.add_patch(plt.Rectangle((col, row), 1, 1, facecolor="#ffd27f" if here else "#e8eef7",
                                   edgecolor="black"))
        ax.text(col + 0.5, row + 0.62, advice, ha="center", va="center", fontsize=11)
        ax.text(col + 0.5, row + 0.3, f"strategy: {strategy}", ha="center", va="center", fontsize=9,
                family="monospace")
        if here:
            ax.text(col + 0.5, row + 0.1, f"<- {label}", ha="center", va="center", fontsize=10, weight="bold",
                    color="darkred")
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 2)
    ax.set_xticks([0.5, 1.5], ["similar to ImageNet", "different from ImageNet"])
    ax.set_yticks([0.5, 1.5], ["LARGE dataset", "SMALL dataset"])
    ax.tick_params(length=0)
    ax.set_title("Transfer-learning guide: dataset size x similarity")
    return fig


def count_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass at ``image_size`` (torch's FlopCounterMode; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def cpu_latency_ms(model: nn.Module, image_size: int, repeats: int = 3) -> float:
    """Milliseconds for one image (batch 1) on the CPU: the best of ``repeats`` runs after a warm-up
    (the minimum is the run least disturbed by other processes)."""
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            started = time.perf_counter()
            model(x)
            if i:  # the first pass allocates and picks kernels
                times.append(time.perf_counter() - started)
    return 1000 * min(times)


def compare_backbones(names: list[str], num_classes: int | None = None, repeats: int = 3) -> pd.DataFrame:
    """Parameters, FLOPs, input size, weights and CPU latency of each backbone.

    Models are built with ``pretrained=False`` (no download), which has the same architecture
    and cost; ImageNet top-1 is only shown where the weights' metadata gives it.
    """
    offline = set(offline_backbones())
    rows = []
    for name in names:
        model = create_model(name, num_classes, pretrained=False)
        size = model.spec.input_size
        rows.append({"backbone": name, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
                     "GFLOPs": count_flops(model, size) / 1e9, "input_size": size, "source": model.spec.source,
                     "offline": name in offline, "imagenet_top1": model.spec.imagenet_top1,
                     "cpu_ms_per_image": cpu_latency_ms(model, size, repeats)})
    return pd.DataFrame(rows).round({"parameters_M": 2, "GFLOPs": 2, "cpu_ms_per_image": 1})


def sample_loader(dataset: ImageDataset, n: int, seed: int = 0, batch_size: int = 50) -> torch.utils.data.DataLoader:
    """A loader over ``n`` images (or all, if fewer) drawn at random from ``dataset``."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, picks.tolist()), batch_size=batch_size)


def subsample(frame: pd.DataFrame, n: int, seed: int = 0, column: str = "label") -> pd.DataFrame:
    """At most ``n`` rows of ``frame``, stratified on ``column`` (all rows when there are fewer)."""
    if n >= len(frame):
        return frame.reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    part, _ = train_test_split(frame, train_size=n, stratify=frame[column], random_state=seed)
    return part.reset_index(drop=True)


REFERENCE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "horse")


def reference_photos(transform) -> dict[str, torch.Tensor]:
    """A few everyday photos from scikit-image, preprocessed with ``transform``."""
    import skimage.data
    from skimage.color import gray2rgb
    from skimage.util import img_as_ubyte

    photos = {}
    for name in REFERENCE_PHOTOS:
        image = img_as_ubyte(getattr(skimage.data, name)())
        image = gray2rgb(image) if image.ndim == 2 else image[..., :3]
        photos[name] = transform(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return photos


def plot_similarity(per_image: np.ndarray, photos: dict[str, float], threshold: float,
                    label: str = "this dataset") -> plt.Figure:
    """Histogram of per-image similarity, with the reference photos and the threshold marked."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.hist(per_image, bins=30, range=(0, 1), color="steelblue", alpha=0.8, label=f"{label} ({len(per_image)})")
    for i, (name, value) in enumerate(photos.items()):
        ax.axvline(value, color="darkorange", lw=1.5)
        ax.text(value, ax.get_ylim()[1] * (0.92 - 0.08 * i), f" {name}", color="darkorange", fontsize=8)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold}")
    ax.set_xlabel("similarity = 1 - normalized entropy of the ImageNet prediction")
    ax.set_ylabel("images")
    ax.legend(loc="upper center")
    return fig


def linear_probe(backbone: str, root, frame: pd.DataFrame, classes: list[str], image_size: int,
                 crop_pct: float | None = None, folds: int = 5, seed: int = 0, device=None) -> dict:
    """Cross-validated logistic regression on a frozen backbone's pooled features.

    A cheap stand-in for fine-tuning: how linearly separable are the classes in this
    backbone's feature space? ``frame`` is a label table (file, label[, group]).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .cache import extract_features
    from .runtime import pick_device

    started = time.perf_counter()
    model = create_model(backbone, len(classes))
    dataset = ImageDataset(root, frame[["file", "label"]], classes=classes,
                           transform=eval_transform(model, image_size, crop_pct))
    features, targets = extract_features(model, dataset, len(model.group_names) - 1, pick_device(device),
                                         num_workers=0 if len(dataset) < 256 else None, progress=False)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    folds = min(folds, int(np.bincount(targets.numpy()).min()))
    scores = cross_validate(probe, features.numpy(), targets.numpy(),
                            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                            scoring=("accuracy", "balanced_accuracy"))
    return {"backbone": backbone, "images": len(dataset), "image_size": image_size, "features": features.shape[1],
            "accuracy": float(scores["test_accuracy"].mean()),
            "balanced_accuracy": float(scores["test_balanced_accuracy"].mean()),
            "seconds": round(time.perf_counter() - started, 1)}


def choose_backbone(ranking: pd.DataFrame, costs: pd.DataFrame, tolerance: float = 0.02) -> str:
    """The cheapest backbone (CPU latency) whose probe score is within ``tolerance`` of the best."""
    table = ranking.merge(costs[["backbone", "cpu_ms_per_image"]], on="backbone")
    best = table["balanced_accuracy"].max()
    close = table[table["balanced_accuracy"] >= best - tolerance]
    return str(close.sort_values("cpu_ms_per_image")["backbone"].iloc[0])


# ----------------------------------------------------------------------------------------
# 02: the article's dataset class, exploration, transforms


def bgr_demo() -> plt.Figure:
    """What the article's ``cv2.imread`` feeds the network: blue and red swapped."""
    import tempfile
    from pathlib import Path

    import cv2
    import skimage.data

    from .data import read_image

    rgb = skimage.data.coffee()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "coffee.png"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # a normal PNG on disk
        as_article = cv2.imread(str(path))  # BGR order, shown as if it were RGB
        as_helpers = read_image(path)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, image, title in ((axes[0], as_article, "article: cv2.imread (BGR)"),
                             (axes[1], as_helpers, "helpers.data.read_image (RGB)")):
        ax.imshow(image)
        ax.set_title(title)
        ax.axis("off")
    return fig


def image_stats(dataset: ImageDataset, n: int | None = None) -> pd.DataFrame:
    """How the files are stored: size, channels and bit depth per image, counted."""
    import cv2

    files = dataset.files if n is None else dataset.files[:n]
    rows = []
    for file in files:
        image = cv2.imread(str(dataset.root / file), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"cannot decode {dataset.root / file}")
        rows.append({"height": image.shape[0], "width": image.shape[1],
                     "channels": 1 if image.ndim == 2 else image.shape[2], "dtype": str(image.dtype)})
    return pd.DataFrame(rows).value_counts().rename("images").reset_index()


def plot_examples(dataset: ImageDataset, per_class: int = 6, seed: int = 0) -> plt.Figure:
    """A grid: one row per class, ``per_class`` random raw images in each."""
    rng = np.random.default_rng(seed)
    classes = dataset.classes
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.7 * len(classes)), squeeze=False)
    targets = np.asarray(dataset.targets)
    for row, name in enumerate(classes):
        members = np.flatnonzero(targets == row)
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(picks):
                ax.imshow(dataset.load(int(picks[col])).permute(1, 2, 0).numpy())
        axes[row][0].set_title(name, loc="left", fontsize=10)
    fig.tight_layout()
    return fig


def plot_intensity(dataset: ImageDataset, n: int = 200, seed: int = 0) -> plt.Figure:
    """Grey-level histograms per class (density), from up to ``n`` images."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    targets = np.asarray(dataset.targets)
    for index, name in enumerate(dataset.classes):
        chosen = [int(i) for i in picks if targets[i] == index]
        if not chosen:
            continue
        values = torch.cat([dataset.load(i).float().mean(0).flatten() for i in chosen]).numpy()
        ax.hist(values, bins=64, range=(0, 255), density=True, histtype="step", lw=1.5, label=name)
    ax.set_xlabel("pixel intensity (mean of R, G, B)")
    ax.set_ylabel("density")
    ax.legend()
    return fig


def plot_pipeline(image: torch.Tensor, spec, image_size: int, crop_pct: float | None = None) -> plt.Figure:
    """The eval transform step by step on one uint8 image: raw, SquarePad, Resize, CenterCrop, Normalize."""
    transform = eval_transform(spec, image_size, crop_pct)
    steps, x = [("raw", image)], image
    for t in transform.transforms:
        x = t(x)
        steps.append((type(t).__name__, x))
    steps = [s for s in steps if s[0] != "ToDtype"]
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 2.9))
    for ax, (name, x) in zip(axes, steps):
        shown = x.float()
        if name == "Normalize":
            shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-8)
        elif shown.max() > 1.5:
            shown = shown / 255
        ax.imshow(shown.permute(1, 2, 0).clamp(0, 1).numpy())
        extra = f"\n[{x.min():.2f}, {x.max():.2f}]" if name == "Normalize" else ""
        ax.set_title(f"{name}\n{tuple(x.shape[-2:])}{extra}", fontsize=9)
        ax.axis("off")
    return fig


def plot_augmentations(image: torch.Tensor, transform, n: int = 8, seed: int = 0) -> plt.Figure:
    """``n`` random training views of one image (de-normalized for display)."""
    torch.manual_seed(seed)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2))
    for ax in axes:
        view = transform(image)
        view = (view - view.min()) / (view.max() - view.min() + 1e-8)
        ax.imshow(view.permute(1, 2, 0).numpy())
        ax.axis("off")
    return fig


# ----------------------------------------------------------------------------------------
# 03: strategies, their cost, and the BatchNorm lesson


def strategy_options(strategy: str) -> dict:
    """The options the course uses for each strategy (n groups for last_n / initial / truncate)."""
    return {"last_n": {"n": 2}, "initial": {"n": 2}, "truncate": {"n": 1}}.get(strategy, {})


def strategy_table(backbone: str, num_classes: int) -> pd.DataFrame:
    """Trainable parameters of every strategy on ``backbone`` (one row per strategy)."""
    rows = []
    for strategy in STRATEGIES:
        model = apply_strategy(create_model(backbone, num_classes, pretrained=False), strategy,
                               **strategy_options(strategy))
        summary = trainable_summary(model).set_index("group")
        trains = summary.index[(summary["state"] == "train")].tolist()
        rows.append({"strategy": strategy, "parameters": int(summary.loc["total", "parameters"]),
                     "trainable": int(summary.loc["total", "trainable"]),
                     "trainable_share": summary.loc["total", "trainable"] / summary.loc["total", "parameters"],
                     "groups_trained": ", ".join(trains), "options": strategy_options(strategy)})
    return pd.DataFrame(rows).round({"trainable_share": 4})


def compare_strategies(backbone: str, train_set, val_set, strategies: list[str], *, epochs: int, lr: float,
                       batch_size: int, seed: int = 0, device=None) -> pd.DataFrame:
    """Train each strategy briefly on the same data; return best validation accuracy and time.

    With a deterministic training transform, fit() caches the frozen prefix once, so the
    strategies that freeze early layers (head, last_n, truncate) pay for one forward pass
    and then train in seconds: part of their appeal on a CPU.
    """
    from .runtime import seed_everything
    from .training import fit

    rows = []
    for strategy in strategies:
        seed_everything(seed)
        model = apply_strategy(create_model(backbone, len(train_set.classes)), strategy,
                               **strategy_options(strategy))
        history = fit(model, train_set, val_set, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      device=device, warmup_epochs=0.3, progress=False)
        rows.append({"strategy": strategy, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "val_accuracy": float(history["val_accuracy"].max()),
                     "final_train_loss": float(history["train_loss"].iloc[-1]),
                     "final_val_loss": float(history["val_loss"].iloc[-1]),
                     "cached": bool(history.attrs["cached"]), "seconds": float(history.attrs["train_seconds"])})
    return pd.DataFrame(rows)


def choose_strategy(results: pd.DataFrame, tolerance: float = 0.01) -> str:
    """Best validation accuracy; within ``tolerance`` of it, the one that trains fewest parameters."""
    best = results["val_accuracy"].max()
    close = results[results["val_accuracy"] >= best - tolerance]
    return str(close.sort_values(["trainable", "seconds"])["strategy"].iloc[0])


def plot_tradeoff(results: pd.DataFrame) -> plt.Figure:
    """Validation accuracy against training time, one point per strategy."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(results["seconds"], results["val_accuracy"], s=60)
    for _, row in results.iterrows():
        ax.annotate(row["strategy"], (row["seconds"], row["val_accuracy"]), textcoords="offset points",
                    xytext=(5, 5))
    ax.set_xlabel("training time (s, including the feature cache)")
    ax.set_ylabel("best validation accuracy")
    ax.grid(alpha=0.3)
    return fig


def first_batchnorm(model: TransferModel) -> nn.modules.batchnorm._BatchNorm:
    return next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def batchnorm_drift(model: TransferModel, batches: list[torch.Tensor], keep_frozen_eval: bool) -> pd.DataFrame:
    """Run ``batches`` through ``model`` in training mode; track the first BatchNorm's running mean.

    ``model`` should be frozen by a strategy (e.g. head): its first BatchNorm has no trainable
    parameters. Returns per step the distance of the running mean from its pretrained value.
    """
    model.keep_frozen_eval = keep_frozen_eval
    bn = first_batchnorm(model)
    start = bn.running_mean.clone()
    rows = []
    model.train()
    with torch.no_grad():
        for step, x in enumerate(batches, 1):
            model(x)
            rows.append({"step": step, "keep_frozen_eval": keep_frozen_eval,
                         "running_mean_change": float((bn.running_mean - start).norm() / start.norm())})
    model.keep_frozen_eval = True
    return pd.DataFrame(rows)

