"""The small experiments and figures the notebooks show, kept out of the notebooks.

Each function answers one question a lesson asks (which backbone? how ImageNet-like is the
data? what does each freezing strategy train? does BatchNorm drift?) and returns a table or
a matplotlib figure, so the notebook cell is one line and the explanation sits around it.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import InputError
from .data import ImageDataset, fold_units, require_folds, subject_folds, subsample, units_of  # noqa: F401 (subsample: notebook 01 calls lessons.subsample)
from .transforms import Preprocessing, eval_transform
from .freezing import STRATEGIES, trainable_summary
from .models import BackboneSpec, TransferModel, create_model, offline_backbones

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
    where = "" if small is None else (f": {label} is {'small' if small else 'large'} and "
                                      f"{'similar' if similar else 'different'} -> {GUIDE[(small, similar)][1]}")
    ax.set_title("Transfer-learning guide, dataset size x similarity" + where, fontsize=10)
    return fig


def count_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass at ``image_size`` (torch's FlopCounterMode; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def cpu_latency_ms(models: list[nn.Module], image_sizes: list[int], repeats: int = 3) -> list[float]:
    """Milliseconds for one image (batch 1) on the CPU, per model: the best of ``repeats`` timed passes after a
    warm-up pass (the minimum is the pass least disturbed by other processes). The passes are interleaved, one
    per model in turn, so that a few seconds of a busy machine slow one pass of several models, not every pass
    of one of them."""
    inputs = []
    for model, size in zip(models, image_sizes, strict=True):
        model.eval().to(memory_format=torch.channels_last)
        inputs.append(torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for model, x, kept in zip(models, inputs, times, strict=True):
                started = time.perf_counter()
                model(x)
                if round_:  # the first pass allocates and picks kernels
                    kept.append(time.perf_counter() - started)
    return [1000 * min(kept) for kept in times]


def compare_backbones(names: list[str], num_classes: int | None = None, repeats: int = 3) -> pd.DataFrame:
    """Parameters, FLOPs, input size, weights and CPU latency of each backbone.

    Models are built with ``pretrained=False`` (no download), which has the same architecture
    and cost; ImageNet top-1 (of the released weights) only where their metadata gives it.
    """
    offline = set(offline_backbones())
    models = [create_model(name, num_classes, pretrained=False) for name in names]
    sizes = [model.spec.input_size for model in models]
    latency = cpu_latency_ms(models, sizes, repeats)
    rows = [{"backbone": name, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
             "GFLOPs": count_flops(model, size) / 1e9, "input_size": size, "source": model.spec.source,
             "offline": name in offline, "imagenet_top1": model.spec.imagenet_top1, "cpu_ms_per_image": ms}
            for name, model, size, ms in zip(names, models, sizes, latency, strict=True)]
    return pd.DataFrame(rows).round({"parameters_M": 2, "GFLOPs": 2, "cpu_ms_per_image": 1})


def sample_loader(dataset: ImageDataset, n: int, seed: int = 0, batch_size: int = 50) -> torch.utils.data.DataLoader:
    """A loader over ``n`` images (or all, if fewer) drawn at random from ``dataset``."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, picks.tolist()), batch_size=batch_size)


def plot_similarity_scale(score: float, references: dict[str, float], threshold: float,
                          label: str = "this dataset") -> plt.Figure:
    """This dataset's similarity on the scale of the reference data sets it was calibrated with."""
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.axvspan(threshold, 1, color="#e8f3e8")
    ax.axvspan(0, threshold, color="#f7ecec")
    for i, (name, value) in enumerate(sorted(references.items(), key=lambda kv: kv[1])):
        ax.plot(value, 0, "o", color="grey")
        ax.annotate(name, (value, 0), xytext=(0, (12, -18, 24, -30)[i % 4]), textcoords="offset points",
                    ha="center", fontsize=7, color="dimgrey")
    ax.plot(score, 0, "D", color="darkred", markersize=9)
    ax.annotate(f"{label}: {score:.2f}", (score, 0), xytext=(0, 44), textcoords="offset points", ha="center",
                fontsize=9, color="darkred", weight="bold", arrowprops={"arrowstyle": "-", "color": "darkred"})
    ax.axvline(threshold, color="black", ls="--", lw=1)
    ax.text(threshold / 2, -0.8, "different from ImageNet", ha="center", fontsize=8)
    ax.text((1 + threshold) / 2, -0.8, "similar to ImageNet", ha="center", fontsize=8)
    ax.set(xlim=(0, 1), ylim=(-1, 1), yticks=[], xlabel="similarity (helpers.freezing.measure_similarity)")
    side = "similar to" if score >= threshold else "different from"
    ax.set_title(f"{label}: {score:.2f}, {side} ImageNet (threshold {threshold})", fontsize=10)
    fig.tight_layout()
    return fig


def linear_probe(backbone: str, root: str | Path, frame: pd.DataFrame, classes: list[str], image_size: int,
                 crop_pct: float | None = None, folds: int = 5, seed: int = 0,
                 device: str | torch.device | None = None, metric: str = "accuracy") -> dict:
    """Cross-validated logistic regression on a frozen backbone's pooled features: accuracy, balanced accuracy
    and macro-F1 (mean over the folds).

    A cheap stand-in for fine-tuning: how linearly separable are the classes in this
    backbone's feature space? ``frame`` is a label table (file, label[, group][, subject]). The same
    lines as notebook 01 writes by hand: standardize, ``LogisticRegression(C=0.1)``,
    stratified k-fold (k = ``folds``, at most the smallest class's count; with a ``subject`` column,
    and for copies of one picture, folds that keep each whole: `helpers.data.fold_units`, `require_folds`). For a
    ``metric`` that counts every class the same (macro-F1), the classes are weighted by inverse frequency, as the
    probe of notebook 04 weighs them (`helpers.metrics.class_weighting`).
    """
    from .metrics import class_weighting
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .probe import pooled_features

    counts = frame["label"].value_counts()
    if counts.min() < 2:
        raise ValueError(f"cannot cross-validate a probe on {len(frame)} images: a class has only one of them "
                         f"(images per class: {counts.to_dict()}); sample with lessons.subsample, which keeps 2")
    units = fold_units(root, frame)  # subjects and byte-identical copies stay on one side of every fold
    folds = require_folds(frame["label"].to_numpy(), units, folds, "a probe")
    started = time.perf_counter()
    model = create_model(backbone, len(classes))
    dataset = ImageDataset(root, frame[["file", "label"]], classes=classes,
                           transform=eval_transform(model, image_size, crop_pct))
    features, targets = pooled_features(model, dataset, device)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000,
                                                               class_weight=class_weighting(metric)))
    cv = (StratifiedKFold(folds, shuffle=True, random_state=seed) if units is None
          else subject_folds(targets, units, folds, seed))
    scores = cross_validate(probe, features, targets, cv=cv, scoring=("accuracy", "balanced_accuracy", "f1_macro"))
    return {"backbone": backbone, "images": len(dataset), "image_size": image_size, "features": features.shape[1],
            "accuracy": float(scores["test_accuracy"].mean()),
            "balanced_accuracy": float(scores["test_balanced_accuracy"].mean()),
            "macro_f1": float(scores["test_f1_macro"].mean()),
            "seconds": round(time.perf_counter() - started, 1)}


def choose_backbone(ranking: pd.DataFrame, costs: pd.DataFrame, tolerance: float = 0.02,
                    metric: str = "balanced_accuracy") -> str:
    """The cheapest backbone whose probe ``metric`` is within ``tolerance`` of the best (inclusive: scores on
    a few hundred images move in steps, and 2 points behind counts as within). Cheapest = fewest GFLOPs, then
    CPU latency: FLOPs do not depend on how busy the machine is, so the same seed makes the same choice."""
    table = ranking.merge(costs[["backbone", "GFLOPs", "cpu_ms_per_image"]], on="backbone")
    best = table[metric].max()
    close = table[table[metric] >= best - tolerance - 1e-9]
    return str(close.sort_values(["GFLOPs", "cpu_ms_per_image"])["backbone"].iloc[0])


# ----------------------------------------------------------------------------------------
# 02: the article's dataset class, exploration, transforms


def bgr_demo() -> plt.Figure:
    """What the article's ``cv2.imread`` feeds the network: blue and red swapped."""
    import tempfile
    from pathlib import Path

    import cv2
    import skimage.data

    from .data import decode_image, read_image

    rgb = skimage.data.coffee()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "coffee.png"
        # imencode/tofile and imdecode/fromfile: imwrite and imread fail silently on a non-ASCII path on Windows
        encoded, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # a normal PNG on disk
        if not encoded:
            raise OSError(f"could not encode the coffee image as PNG for {path}")
        data.tofile(path)
        as_article = decode_image(path)  # as stored, BGR order: what cv2.imread returns for this PNG
        as_helpers = read_image(path)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, image, title in ((axes[0], as_article, "article: cv2.imread (BGR)"),
                             (axes[1], as_helpers, "helpers.data.read_image (RGB)")):
        ax.imshow(image)
        ax.set_title(title)
        ax.axis("off")
    return fig


def image_stats(dataset: ImageDataset, n: int | None = None) -> pd.DataFrame:
    """How the files are stored: size, channels and bit depth per image, counted, with the largest pixel value
    stored in each format (``largest_value``) and how many of its 16-bit images never exceed 4095
    (``within_12_bits``: 12-bit data, which the reader's division by 257 turns dark).

    Every image (or the first ``n``) is decoded once, with the checks training makes, so that a file that
    cannot be read stops notebook 02 with every such file named at once, not notebook 04 minutes later.
    """
    from .data import ImageReadError, decode_image, to_rgb_uint8

    files = dataset.files if n is None else dataset.files[:n]
    rows, bad = [], {}
    for file in files:
        path = dataset.root / file
        try:
            image = decode_image(path)
            to_rgb_uint8(image, path)  # its checks too (floating-point range, channels), as training reads it
        except ImageReadError as err:
            bad[file] = str(err)
            continue
        rows.append({"height": image.shape[0], "width": image.shape[1],
                     "channels": 1 if image.ndim == 2 else image.shape[2], "dtype": str(image.dtype),
                     "largest_value": image.max().item() if image.size else 0})
        # an all-black image is another problem (twelve_bit_note names it when every 16-bit image is black)
        rows[-1]["within_12_bits"] = rows[-1]["dtype"] == "uint16" and 0 < rows[-1]["largest_value"] <= TWELVE_BIT_MAX
    if bad:
        raise ImageReadError(f"{len(bad)} of {len(files)} image(s) cannot be read: {list(bad.values())[:20]}; "
                             f"replace or delete them (or drop their rows from the label table) and rerun")
    formats = ["height", "width", "channels", "dtype"]
    table = pd.DataFrame(rows, columns=[*formats, "largest_value", "within_12_bits"])
    return (table.groupby(formats).agg(images=("largest_value", "size"), largest_value=("largest_value", "max"),
                                       within_12_bits=("within_12_bits", "sum"))
            .reset_index().sort_values("images", ascending=False, kind="stable").reset_index(drop=True))


TWELVE_BIT_MAX = 4095  # 16-bit files whose values never exceed this hold 12-bit data (many scientific cameras)


def twelve_bit_note(stats: pd.DataFrame) -> str:
    """A warning sentence when 16-bit images of `image_stats`' table stay within 12 bits (all of them, or some:
    then they train darker than the rest), else ""."""
    deep = stats[stats["dtype"] == "uint16"]
    if deep.empty:
        return ""
    dim = int(deep["within_12_bits"].sum()) if "within_12_bits" in deep else 0
    if deep["largest_value"].max() > TWELVE_BIT_MAX:
        if not dim:
            return ""
        return (f"**{dim} of the {int(deep['images'].sum())} 16-bit images never exceed {TWELVE_BIT_MAX}**: 12-bit "
                f"data, stored beside files that use the full 16-bit range. The reader maps 0–65535 to 0–255, so "
                f"these train at most 16 of 255, far darker than the others; if they come from one camera or one "
                f"class, the model can learn their brightness instead of what they show. Rescale the 12-bit files "
                f"to the full range (multiply by 16) or save everything as 8-bit, then rerun. ")
    top, count = int(deep["largest_value"].max()), int(deep["images"].sum())
    if top == 0:
        return f"**The {count} 16-bit images are entirely 0 (black)**: check how they were exported. "
    return (f"**The {count} 16-bit images never exceed {top}**: 12-bit (or fewer-bit) data stored in 16-bit files, "
            f"as many scientific cameras write them. The reader maps 0–65535 to 0–255 (dividing by 257), so these "
            f"images would reach only {top / 257:.0f} of 255 and train nearly black. Rescale them to the full 16-bit "
            f"range (multiply by 16 for 12-bit data, by 2 ** (16 - bits) in general) or save them as 8-bit, then "
            f"rerun. ")


def plot_examples(dataset: ImageDataset, per_class: int = 6, seed: int = 0, max_classes: int = 20) -> plt.Figure:
    """A grid: one row per class, ``per_class`` random raw images in each; the first ``max_classes`` classes
    only (the title says how many were left out), since a row per class of 100 would be a 170-inch figure."""
    rng = np.random.default_rng(seed)
    classes = dataset.classes[:max_classes]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.7 * len(classes)), squeeze=False)
    if len(dataset.classes) > len(classes):
        fig.suptitle(f"the first {len(classes)} of {len(dataset.classes)} classes "
                     f"({len(dataset.classes) - len(classes)} left out)", fontsize=11)
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
    ax.set_title(f"Grey levels per class ({len(picks)} images)", fontsize=10)
    ax.set_ylabel("density")
    ax.legend()
    return fig


def plot_pipeline(image: torch.Tensor, spec: BackboneSpec | TransferModel, image_size: int,
                  crop_pct: float | None = None) -> plt.Figure:
    """The eval transform step by step on one uint8 image: raw, SquarePad, Resize, CenterCrop, Normalize.

    The normalized tensor is shown mapped back to colours (x * std + mean), not stretched to its own
    min and max (which would make every image look equally bright); its title gives the real range.
    """
    transform = eval_transform(spec, image_size, crop_pct)
    prep = transform.preprocessing
    steps, x = [("raw", image)], image
    for t in transform.transforms:
        x = t(x)
        steps.append((type(t).__name__, x))
    steps = [s for s in steps if s[0] != "ToDtype"]
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 2.9))
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    for ax, (name, x) in zip(axes, steps, strict=True):
        shown = x * std + mean if name == "Normalize" else x.float() / 255
        ax.imshow(shown.permute(1, 2, 0).clamp(0, 1).numpy())
        extra = f"\nvalues in [{x.min():.2f}, {x.max():.2f}]" if name == "Normalize" else ""
        ax.set_title(f"{name}\n{tuple(x.shape[-2:])}{extra}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_augmentations(image: torch.Tensor, transform: Callable, n: int = 8, seed: int = 0,
                       preprocessing: Preprocessing | None = None) -> plt.Figure:
    """``n`` random training views of one image, mapped back to colours (x * std + mean of ``preprocessing``,
    by default the transform's own), so that brightness is shown as the network receives it."""
    torch.manual_seed(seed)
    prep = preprocessing or transform.preprocessing
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.2), squeeze=False)
    for ax in axes[0]:
        view = (transform(image) * std + mean).clamp(0, 1)
        ax.imshow(view.permute(1, 2, 0).numpy())
        ax.axis("off")
    fig.suptitle(f"{n} random training views ({getattr(transform, 'augment', 'augmented')} recipe)", fontsize=10)
    fig.tight_layout()
    return fig


# The mirror images notebook 05's test-time augmentation can average over, by the tensor dimensions
# they reverse (the same dims as `helpers.evaluation.TTA_MODES`).
MIRRORS = {"horizontal mirror": (-1,), "vertical mirror": (-2,)}


def recipe_mirrors(recipe: str) -> list[str]:
    """The mirrors augmentation ``recipe`` uses at test time (`TTA_FLIPS`, `TTA_MODES`); for a recipe without
    flips (the "_no_flip" ones, "none"), the horizontal mirror, the one "natural" would add, so the check says
    whether that recipe would be safe."""
    from .evaluation import TTA_MODES
    from .transforms import TTA_FLIPS

    dims = TTA_MODES[TTA_FLIPS[recipe]] or TTA_MODES[TTA_FLIPS["natural"]]
    return [name for name, flipped in MIRRORS.items() if flipped in dims]


class Mirrored(torch.utils.data.Dataset):
    """``dataset`` with every image tensor reversed along ``dims`` (after its transform)."""

    def __init__(self, dataset, dims: tuple[int, ...]):
        self.dataset, self.dims = dataset, dims

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        return x.flip(self.dims), y


# Below this many validation images a mirror's effect cannot be judged at all.
MIN_MIRROR_IMAGES = 5
DIAGNOSTIC_USE = "scored on mirrors"  # the row of mirror_check that no training or test-time use imitates


def stratified_subset(dataset: ImageDataset, n: int, seed: int = 0) -> torch.utils.data.Subset:
    """About ``n`` items of ``dataset`` (a few more when rare classes round up), every class kept in its share
    and present at least once; a dataset without ``targets`` is sampled at random, as by `subset`."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(dataset) <= n:
        return subset(dataset, n, seed)
    targets, rng = np.asarray(targets), np.random.default_rng(seed)
    picks = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        take = max(1, round(n * len(members) / len(targets)))
        picks.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
    return torch.utils.data.Subset(dataset, sorted(picks))


def mirror_check(model: TransferModel, train_set: ImageDataset, val_set: ImageDataset, mirrors: list[str],
                 max_train: int = 400, seed: int = 0, device: str | torch.device | None = None,
                 metric: str = "accuracy") -> pd.DataFrame:
    """Does a mirror image keep its label? Measured with a linear probe on the frozen backbone.

    The probe is fitted on the features of (about ``max_train``, stratified) training images as stored,
    and scored on the validation images (row ``as stored``, the reference). Then, per mirror:
    - ``scored on mirrors`` (a diagnostic): the same probe answers for the mirrored validation images. A
      loss means the mirror looks like another class to this backbone: the flip changes the label (a "2"),
      or it makes images unlike the data (an upside-down photo);
    - ``averaged at test``: each image's probabilities averaged with its mirror's, which approximates
      notebook 05's test-time augmentation;
    - ``trained on mirrors``: the probe refitted on the training images *and* their mirrors (C halved, so
      that doubling the images does not also weaken the regularization), scored on the images as stored:
      what augmentation does to training.
    ``score`` is ``metric`` (the run's selection metric: macro-F1 catches a mirror that ruins a rare class,
    which accuracy hides), ``accuracy`` is reported beside it. ``loss_beyond_noise`` marks a score below the
    reference by more than two standard errors of the paired difference (``margin``; a bootstrap over the images
    for macro-F1, over whole subjects when the data names them, `helpers.selection.difference_se`). A loss
    within the margin is no evidence either way; several rows at two standard errors each also raise the odds
    of one false alarm, which is why a loss only takes the flips out of the recipe
    (`helpers.workbook.settle_augment`), a cheap change, and nothing else.
    """
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning

    from .metrics import score
    from .probe import fit_probe, pooled_features
    from .selection import TIE_SE, difference_se

    unknown = [m for m in mirrors if m not in MIRRORS]
    if unknown:
        raise ValueError(f"unknown mirror(s) {unknown}; choose from {list(MIRRORS)}")
    if len(val_set) == 0:
        raise ValueError("mirror_check needs validation images; the validation split is empty")
    few = stratified_subset(train_set, max_train, seed)
    train_features, train_targets = pooled_features(model, few, device)
    probe = fit_probe(train_features, train_targets, seed=seed, metric=metric,  # weighted as the run's probe is
                      groups=units_of(few))  # and C chosen on folds of whole subjects and copies, as the run's is
    val_features, targets = pooled_features(model, val_set, device)
    subjects = units_of(val_set)  # resampled whole for the margins: one subject's images (or copies) err together
    classes = probe.pipeline.classes_
    reference = probe.predict(val_features)
    reference_score = score(metric, targets, reference)
    rows = [{"mirror": "none", "use": "as stored", "metric": metric, "score": reference_score,
             "accuracy": float((reference == targets).mean()), "difference": 0.0, "margin": 0.0,
             "changed_answers": 0, "loss_beyond_noise": False}]
    for name in mirrors:
        mirrored_val = pooled_features(model, Mirrored(val_set, MIRRORS[name]), device)[0]
        mirrored_train = pooled_features(model, Mirrored(few, MIRRORS[name]), device)[0]
        averaged = probe.pipeline.predict_proba(val_features) + probe.pipeline.predict_proba(mirrored_val)
        augmented = clone(probe.pipeline).set_params(logisticregression__C=probe.C / 2)
        with warnings.catch_warnings():  # as in fit_probe: strong regularization converges slowly, harmlessly
            warnings.simplefilter("ignore", ConvergenceWarning)
            augmented.fit(np.concatenate([train_features, mirrored_train]),
                          np.concatenate([train_targets, train_targets]))
        for use, pred in ((DIAGNOSTIC_USE, probe.predict(mirrored_val)),
                          ("averaged at test", classes[averaged.argmax(1)]),
                          ("trained on mirrors", augmented.predict(val_features))):
            mirrored_score = score(metric, targets, pred)
            difference = float(mirrored_score - reference_score)
            margin = TIE_SE * difference_se(metric, targets, pred, reference, seed=seed, groups=subjects)
            rows.append({"mirror": name, "use": use, "metric": metric, "score": mirrored_score,
                         "accuracy": float((pred == targets).mean()), "difference": difference, "margin": margin,
                         "changed_answers": int((pred != reference).sum()),
                         "loss_beyond_noise": bool(len(targets) >= MIN_MIRROR_IMAGES and difference < -margin)})
    return pd.DataFrame(rows)


def mirror_conflicts(check: pd.DataFrame, recipe: str) -> list[str]:
    """The mirrors ``recipe`` uses for which some row of `mirror_check`'s table lost beyond the noise."""
    from .transforms import TTA_FLIPS

    uses = recipe_mirrors(recipe) if TTA_FLIPS[recipe] else []
    losing = set(check.loc[check["loss_beyond_noise"], "mirror"])
    return [mirror for mirror in uses if mirror in losing]


def _mirror_score(row: pd.Series) -> str:
    value = row.get("score", row["accuracy"])  # tables written before the score column hold accuracy only
    if not row["changed_answers"]:
        return f"{row['use']} {value:.3f} (no answer changed)"
    if row["margin"] == 0:  # every changed answer was wrong before and after
        return f"{row['use']} {value:.3f} ({row['changed_answers']} answers changed, all wrong either way)"
    return f"{row['use']} {value:.3f} ({row['difference']:+.3f}, noise {plus_minus(row['margin'])})"


def mirror_advice(check: pd.DataFrame, recipe: str, images: int, settled: str | None = None) -> str:
    """What `mirror_check`'s table means for the augmentation ``recipe`` (markdown, from its numbers).

    ``settled``: the recipe notebooks 03-05 will use (`helpers.workbook.settle_augment`), when it differs
    from ``recipe`` because the mirrors lost.
    """
    from .transforms import TTA_FLIPS, WITHOUT_MIRRORS

    first = check.iloc[0]
    reference, name = first.get("score", first["accuracy"]), str(first.get("metric", "accuracy")).replace("_", "-")
    if images < MIN_MIRROR_IMAGES:
        return (f"With {images} validation image(s) a mirror's effect cannot be judged (the check needs at least "
                f"{MIN_MIRROR_IMAGES}): decide from what your images show.")
    lines = [f"As stored, the probe scores {reference:.3f} ({name}) on {images} validation images."]
    for mirror, rows in check.iloc[1:].groupby("mirror", sort=False):
        gains = rows[(rows["margin"] > 0) & (rows["difference"] > rows["margin"])]  # a surprise, said not hidden
        verdict = (f"**it loses {name} beyond the noise**" if rows["loss_beyond_noise"].any() else
                   "no loss beyond the noise" + (f"; *{'*, *'.join(gains['use'])}* gained beyond it, which is read "
                                                 f"like no loss (below)" if len(gains) else ""))
        lines.append(f"- **{mirror}**: " + "; ".join(_mirror_score(row) for _, row in rows.iterrows())
                     + f": {verdict}.")
    conflicts = mirror_conflicts(check, recipe)
    losing = [m for m in MIRRORS if m in set(check.loc[check["loss_beyond_noise"], "mirror"])]
    if conflicts:
        them = "it" if len(conflicts) == 1 else "them"
        uses = (f"The `{recipe}` recipe trains on the {' and '.join(conflicts)} and notebook 05 averages over "
                f"{them} at test time")
        if settled and settled != recipe:
            advice = (f"{uses}, so notebooks 03–05 use `{settled}` instead, the same recipe without flips "
                      f"(written to `dataset.json` as `augment`, because you left `augment = None`). If you know a "
                      f"mirror keeps your labels, set `augment = \"{recipe}\"` and rerun from this notebook.")
        else:
            advice = f"{uses}: set `augment = \"{WITHOUT_MIRRORS[recipe]}\"` and rerun from this notebook."
        lost = check[check["loss_beyond_noise"] & check["mirror"].isin(conflicts)]
        if set(lost["use"]) == {DIAGNOSTIC_USE}:  # the rows that mimic training and test-time use did not lose
            advice += (f" Only the diagnostic row (*{DIAGNOSTIC_USE}*) lost beyond the noise; the rows that mimic "
                       f"how training and notebook 05 use a mirror did not, so this is the weaker kind of evidence.")
    elif losing:
        advice = f"`augment = \"{recipe}\"` does not use the {' and '.join(losing)}: keep it."
    elif not TTA_FLIPS[recipe]:
        advice = ("The horizontal mirror lost nothing beyond the noise: `augment = \"natural\"` (which adds it) "
                  "may suit these images, if the rest of that recipe does.")
    else:
        advice = _no_loss_advice(check, recipe, images)
    return "\n".join(lines + ["", advice])


def _no_loss_advice(check: pd.DataFrame, recipe: str, images: int) -> str:
    """The advice when the recipe's mirrors lost nothing beyond the noise: how strong that evidence is. Many
    changed answers with no measurable loss is a check that could not tell, not a mirror shown to be safe."""
    from .transforms import WITHOUT_MIRRORS

    used = check[check["mirror"].isin(recipe_mirrors(recipe))]
    changed = int(used["changed_answers"].max()) if len(used) else 0
    if changed < max(3, 0.1 * images):
        return (f"Nothing here argues against the `{recipe}` recipe's mirrors: they changed at most {changed} of the "
                f"{images} validation answers.")
    widest = float(used["margin"].max())
    unseen = (f"a loss smaller than ±{widest:.3f} would go unnoticed" if math.isfinite(widest) else
              "with every validation image of one subject no loss can be measured")
    return (f"No loss beyond the noise, but that is weak evidence here: a mirror changed up to {changed} of the "
            f"{images} validation answers, and {unseen}. If a mirror can change what your images show (digits, "
            f"letters, text, left and right in anatomy), set `augment = \"{WITHOUT_MIRRORS[recipe]}\"`; otherwise "
            f"`{recipe}` can stay.")


# ----------------------------------------------------------------------------------------
# 03: strategies, the BatchNorm trap, the comparison


def strategy_table(backbone: str, num_classes: int) -> pd.DataFrame:
    """Trainable parameters of every strategy on ``backbone`` (one row per strategy)."""
    from .selection import build_model

    rows = []
    for strategy in STRATEGIES:
        model = build_model(backbone, num_classes, strategy, pretrained=False)
        summary = trainable_summary(model).set_index("group")
        trains = summary.index[(summary["state"] == "train")].tolist()
        rows.append({"strategy": strategy, "parameters": int(summary.loc["total", "parameters"]),
                     "trainable": int(summary.loc["total", "trainable"]),
                     "trainable_share": summary.loc["total", "trainable"] / summary.loc["total", "parameters"],
                     "groups_trained": ", ".join(trains),
                     "options": {k: v for k, v in model.strategy.items() if k != "name"}})
    return pd.DataFrame(rows).round({"trainable_share": 4})


def subset(dataset: ImageDataset, n: int, seed: int = 0) -> torch.utils.data.Subset:
    """At most ``n`` items of ``dataset``, drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    return torch.utils.data.Subset(dataset, picks.tolist())


def score_of(model: nn.Module, dataset: ImageDataset, device: str | torch.device | None = None,
             metric: str = "accuracy") -> float:
    """``metric`` of ``model`` on an `ImageDataset` (eval mode)."""
    from .evaluation import predict
    from .metrics import score

    pred = predict(model, dataset, device=device)
    return score(metric, pred["target"].to_numpy(), pred["predicted"].to_numpy())


def first_batchnorm(model: TransferModel) -> nn.modules.batchnorm._BatchNorm:
    return next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def batchnorm_trap(make_head_model: Callable[[], TransferModel], batches: list[torch.Tensor], val_set: ImageDataset,
                   device: str | torch.device | None = None) -> pd.DataFrame:
    """What training mode does to a frozen network, with and without `keep_frozen_eval`.

    ``make_head_model()`` returns a ``head`` model whose classifier was fitted on the frozen features.
    Each way, the ``batches`` run through it in training mode (no weight is updated); we record how far
    the first BatchNorm's running mean moved and the validation accuracy before and after.
    """
    rows = []
    for keep in (True, False):
        model = make_head_model()
        before = score_of(model, val_set, device)
        bn = first_batchnorm(model)
        start = bn.running_mean.clone()
        model.keep_frozen_eval = keep
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x.to(next(model.parameters()).device))
        model.keep_frozen_eval = True
        rows.append({"keep_frozen_eval": keep, "running_mean_change": float((bn.running_mean - start).norm()
                                                                            / start.norm()),
                     "val_accuracy_before": before, "val_accuracy_after": score_of(model, val_set, device)})
    return pd.DataFrame(rows)


def majority_score(train: pd.DataFrame, scored: list[pd.DataFrame], metric: str = "accuracy",
                   classes: list[str] | None = None) -> float:
    """``metric`` of always answering the most frequent training label, on the ``scored`` tables together
    (the same images and the same metric the strategies are compared by). Equally frequent labels go to the
    first in ``classes`` (the one `helpers.probe.majority_baseline` answers), else the first in sorted order."""
    from .metrics import score

    counts = train["label"].value_counts()
    tied = counts.index[counts == counts.iloc[0]]
    order = list(classes) if classes is not None else sorted(tied)
    majority = min(tied, key=lambda label: order.index(label) if label in order else len(order))
    labels = pd.concat(scored)["label"].to_numpy()
    return score(metric, labels, np.array([majority] * len(labels), dtype=labels.dtype))


def plot_comparison(results: pd.DataFrame, majority: float, guide_pick: str | None = None,
                    metric: str = "accuracy") -> plt.Figure:
    """Score ± one standard error per strategy, in ``results``' rank order (`selection.summarize`), with the
    majority baseline, the linear probe (``head``) and the guide's pick marked; the from-scratch control in grey."""
    from .selection import CONTROL

    fig, ax = plt.subplots(figsize=(7.5, 4))
    order = results.iloc[::-1]  # the table's rank order (exact ties cheapest first), rank 1 on top
    colors = ["grey" if s == CONTROL else ("darkorange" if s == guide_pick else "steelblue") for s in order["strategy"]]
    ax.barh(order["strategy"], order["score"], xerr=order["se"], color=colors, capsize=3)
    ax.axvline(majority, color="black", ls="--", lw=1, label=f"majority class ({majority:.3f})")  # same metric
    probe = results.set_index("strategy").loc["head", "score"]
    ax.axvline(probe, color="seagreen", ls=":", lw=1.5, label=f"linear probe = head ({probe:.3f})")
    low = max(0.0, min(majority, order["score"].min()) - 0.05)
    ax.set_xlim(low, min(1.0, order["score"].max() + order["se"].max() + 0.05))
    ax.set_xlabel(f"validation {metric.replace('_', ' ')} (bars: ± 1 standard error of each score;\n"
                  f"a tie is judged on 2 standard errors of the paired difference, se_vs_best)", fontsize=9)
    ax.set_title("Strategies under one recipe and budget" + (f"; orange: the guide's pick ({guide_pick})"
                                                             if guide_pick else "") + "; grey: from scratch",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# 04: speed of a training step on this device


def training_step_speed(backbone: str, device: str | torch.device, image_size: int, batch_size: int,
                        steps: int = 3) -> pd.DataFrame:
    """Images per second of full training steps (forward, backward, AdamW) for each precision and memory
    layout this device supports; each figure is the median of ``steps`` timed steps after a warm-up step.
    On a CPU, which other programs share, the settings take turns, one step each per round, so a busy
    machine slows them alike; on a GPU they run one after the other, one model in memory at a time."""
    import statistics

    from .runtime import amp_dtype, training_step_seconds

    device = torch.device(device)
    settings = [("fp32", None)] + ([(str(amp_dtype(device)).replace("torch.", ""), amp_dtype(device))]
                                    if amp_dtype(device) is not None else [])
    if device.type == "cuda" and amp_dtype(device) == torch.bfloat16:
        settings.append(("float16", torch.float16))
    settings = [(name, dtype, channels_last) for name, dtype in settings for channels_last in (False, True)]

    def prepared(dtype, channels_last):
        torch.manual_seed(0)
        model = create_model(backbone, 2, pretrained=False).to(device).train()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
        y = torch.randint(0, 2, (batch_size,), device=device)
        step = (model, x, y, device, dtype, torch.optim.AdamW(model.parameters(), lr=1e-4),
                torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
        training_step_seconds(*step)  # warm-up: allocations, kernel choice, the optimizer's state
        return step

    times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    if device.type == "cpu":
        steps_by_setting = [prepared(dtype, channels_last) for _, dtype, channels_last in settings]
        for _ in range(steps):
            for i, step in enumerate(steps_by_setting):
                times[i].append(training_step_seconds(*step))
    else:
        for i, (_, dtype, channels_last) in enumerate(settings):
            step = prepared(dtype, channels_last)
            times[i] = [training_step_seconds(*step) for _ in range(steps)]
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = pd.DataFrame([{"precision": name, "channels_last": channels_last,
                           "images_per_second": batch_size / statistics.median(times[i])}
                          for i, (name, _, channels_last) in enumerate(settings)])
    table["speedup"] = table["images_per_second"] / table.loc[0, "images_per_second"]
    return table.round({"images_per_second": 1, "speedup": 2})


def history_summary(history: pd.DataFrame, metric: str = "accuracy", patience: int | None = None,
                    constant: float | None = None, noise: float | None = None, kept: str = "best") -> str:
    """What a `fit` history says, in one paragraph of Markdown: the best epoch, whether validation was still
    improving or had turned down, early stopping, the train-validation gap at the last epoch, and where the time
    went. ``kept``: the epoch whose model is used, ``"best"`` (the checkpoint `fit` restores) or ``"last"``
    (``restore_best=False``, as notebook 04's floor judges it). ``constant``: the validation score of always
    answering the most frequent class (the same metric); the kept epoch within ``noise`` of it (two standard
    errors; 0.02 when not given) has learned little. ``noise`` also decides whether a fall of validation after
    its best epoch is evidence of overfitting (more than ``noise``) or not; without it, any fall counts. Two
    epochs scored on the same images differ less by chance than one score does, so this errs on the cautious
    side."""
    if kept not in ("best", "last"):
        raise ValueError(f"kept must be 'best' or 'last', got {kept!r}")
    column = f"val_{metric}" if f"val_{metric}" in history.columns else "val_accuracy"
    name = column[4:].replace("_", " ")
    best, last = history.loc[history[column].idxmax()], history.iloc[-1]
    declined = last[column] < best[column]  # validation turned down after its best epoch
    # A fall smaller than the noise of one validation score is too little evidence to call overfitting.
    fell_beyond_noise = declined and (noise is None or best[column] - last[column] > noise)
    gap = last["train_accuracy"] - last["val_accuracy"]
    memorized = last["train_accuracy"] >= 0.99 and gap > 0.2  # every training image right, validation far behind
    attrs = history.attrs
    text = (f"Best validation {name} {best[column]:.3f} at epoch {int(best['epoch'])} of {len(history)}"
            + (f" (stopped early: no improvement for {patience} epochs)" if attrs.get("stopped_early") else "")
            + ((f"; it fell to {last[column]:.3f} by the last epoch, and the best checkpoint keeps epoch "
                f"{int(best['epoch'])}." if kept == "best" else
                f"; it fell to {last[column]:.3f} by the last epoch, whose model is the one judged: the best epoch "
                f"was picked by these same validation images, so its score would flatter it.") if declined else
               ", and the last epoch scored as high: validation had not turned down yet"
               + (", but the training images are already all but memorized, so more epochs are unlikely to help much."
                  if memorized else ", so more epochs may help.")
               if len(history) > 1 and not attrs.get("stopped_early") else "."))
    if not declined and len(history) > 1 and "val_loss" in history.columns:
        lowest = history.loc[history["val_loss"].idxmin()]
        if last["val_loss"] > 1.1 * lowest["val_loss"]:  # by more than a tenth: not a wobble
            text += (f" The validation loss, though, rose from its lowest, {lowest['val_loss']:.3f} at epoch "
                     f"{int(lowest['epoch'])}, to {last['val_loss']:.3f}: the model grows more confident in its "
                     f"mistakes before its {name} shows it.")
    if constant is not None:
        shown = best if kept == "best" else last
        above, noise = shown[column] - constant, 0.02 if noise is None else noise
        text += (f" Always answering the most frequent class scores {constant:.3f} here: the {kept} epoch is "
                 f"{abs(above):.3f} {'above' if above >= 0 else 'below'} that"
                 + (f", within the noise (±{noise:.3f}), so the model has learned little so far." if abs(above) <= noise
                    else f", by more than the noise (±{noise:.3f}): worse than a constant answer." if above < 0
                    else "."))
    text += (f" At the last epoch the training accuracy is {last['train_accuracy']:.3f} and the validation "
             f"accuracy {last['val_accuracy']:.3f}: a gap of {gap:+.3f}")
    if gap > 0.05:
        text += ((", a sign of overfitting that the best checkpoint guards against." if kept == "best" else
                  ", a sign of overfitting" + ("; early stopping ended it." if attrs.get("stopped_early") else "."))
                 if fell_beyond_noise else
                 f", and validation fell after its best epoch, but by {best[column] - last[column]:.3f}, within the "
                 f"noise of one validation score (±{noise:.3f}): too little evidence to call it overfitting."
                 if declined else
                 ": the model has learned its training images far better than the task, even though validation has "
                 "not turned down (yet)." if memorized else
                 ": the model fits its training images better, but with validation not yet turning down this is "
                 "not overfitting yet.")
    elif gap < -0.05:
        text += (": training accuracy, averaged over the epoch while the weights still change and with dropout on, "
                 "trails validation, so there is no overfitting yet.")
    else:
        text += "."
    if "train_seconds" in attrs:
        text += (f" Training took {_seconds(attrs['train_seconds'])} on {attrs['device']}"
                 + (f", {_seconds(attrs['cache_seconds'])} of it for the feature cache." if attrs.get("cached")
                    else "."))
    return text


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


# ----------------------------------------------------------------------------------------
# 05: the final model beside its baselines


def results_table(metrics: dict, baselines: dict, metric: str = "accuracy", final: str | None = None) -> pd.DataFrame:
    """The final model's test scores beside the majority class, the linear probe and the from-scratch control.

    The control and the best pretrained strategy are notebook 03's scores (on validation, or cross-validated on
    train + validation: ``split`` says which), which exist only in the metric 03 selected by (``metric``); their
    other columns stay empty (NaN). ``final`` is ``final.json``'s ``model``: when it is ``"probe"`` the last row
    says so, since it then repeats the probe's row."""
    scored = ("accuracy", "balanced_accuracy", "macro_f1")
    rows = [{"model": "majority class", "split": "test", **{k: baselines["majority"][k] for k in scored}},
            {"model": "linear probe", "split": "test", **{k: baselines["probe"][k] for k in scored}}]
    if baselines.get("scratch"):
        empty = dict.fromkeys(scored)
        split = baselines["scratch"].get("split", "validation")
        rows.append({"model": "from scratch (03's budget)", "split": split,
                     **{**empty, metric: baselines["scratch"]["score"]}})
        best = baselines["scratch"].get("pretrained_strategy")  # absent in runs from before it was recorded
        rows.append({"model": f"best pretrained{f', {best}' if best else ''} (03's budget)", "split": split,
                     **{**empty, metric: baselines["scratch"]["pretrained_score"]}})
    rows.append({"model": "final model (the probe)" if final == "probe" else "final model", "split": "test",
                 **{k: metrics[k] for k in scored}})
    return pd.DataFrame(rows)


def plot_baselines(table: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """``metric`` of each row of `results_table`; validation rows hatched."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = table[metric].astype(float)
    bars = ax.barh(table["model"], values, color=["grey", "seagreen", *(["lightgrey"] * (len(table) - 3)),
                                                  "steelblue"][:len(table)])
    for bar, split in zip(bars, table["split"], strict=True):
        if split != "test":
            bar.set_hatch("//")
    for y, v in enumerate(values):
        ax.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"{metric.replace('_', ' ')} (hatched: notebook 03's comparison, at its budget)")
    ax.set_title(f"The final model beside its baselines ({metric.replace('_', ' ')})", fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def accuracy_margin(accuracy: float, n: int) -> float:
    """Two standard errors of an accuracy measured on ``n`` images, with the Agresti-Coull adjustment (two right
    and two wrong answers added), so that an accuracy of 0 or 1 does not claim a margin of zero."""
    adjusted = (accuracy * n + 2) / (n + 4)
    return 2 * math.sqrt(adjusted * (1 - adjusted) / (n + 4))


def accuracy_noise(targets: np.ndarray, predicted: np.ndarray, subjects: np.ndarray | None = None,
                   seed: int = 0) -> float:
    """Two standard errors of the accuracy of ``predicted``: the per-image formula (`accuracy_margin`) or, given
    ``subjects`` (each image's subject, or picture with its copies: `helpers.data.units_of`), a bootstrap over
    them whole, never below the formula. Images of one subject can be right or wrong together (copies of one
    picture always are), and then they are less evidence than as many independent images."""
    from .metrics import subject_margin

    targets, predicted = np.asarray(targets), np.asarray(predicted)
    formula = accuracy_margin(float((targets == predicted).mean()), len(targets))
    if subjects is None:
        return formula
    # The wider of exactly the two estimates `noise_note` names (not also a per-image bootstrap, a third figure)
    return max(formula, subject_margin("accuracy", targets, predicted, subjects, seed=seed))


def plus_minus(margin: float, unit: str = "subject") -> str:
    """A margin as text: "±0.027", or what an infinite one means (every image of one subject, or copies of one
    picture: ``unit``, `accuracy_noise`)."""
    return f"±{margin:.3f}" if math.isfinite(margin) else f"not measurable, since every image shows one {unit}"


def noise_note(n: int, accuracy: float = 0.85, margin: float | None = None, subjects: int | None = None,
               subject_noise: float | None = None, unit: str = "subject") -> str:
    """One sentence on how large a difference ``n`` test images can resolve: ``margin`` (two standard errors,
    from `accuracy_noise`), else the per-image formula. With ``subjects`` (how many groups: subjects, or with
    ``unit="picture"`` pictures with their copies) and ``subject_noise`` (`helpers.metrics.subject_margin`), it
    says which of the two estimates the margin is."""
    formula = accuracy_margin(accuracy, n)
    margin = formula if margin is None else margin
    if not math.isfinite(margin):
        if unit == "picture":
            return (f"All {n} test images are copies of one picture: the noise of the test score cannot be measured, "
                    f"and it says little about other pictures.")
        return (f"All {n} test images show one subject: the noise of the test score cannot be measured, and it "
                f"says little about other subjects. Split with more subjects in test if you can.")
    where = f"{n} test images" + (f" of {subjects} {unit}{'s' if subjects != 1 else ''}" if subjects else "")
    how = ""
    if subjects and subject_noise is not None:
        together = ("a subject's images are right or wrong together" if unit == "subject" else
                    "copies of a picture, right or wrong together, count as one image")
        how = (f" (the wider of two estimates: resampling the {subjects} {unit}s whole gives ±{subject_noise:.3f}, "
               f"which sees it when {together}; the per-image formula gives ±{formula:.3f})")
    return (f"With {where}, two standard errors of an accuracy near {accuracy:.2f} are ±{margin:.3f}{how}: smaller "
            f"differences are within the noise of the split.")


def accuracy_by_stratum(pred: pd.DataFrame, split_table: pd.DataFrame) -> pd.DataFrame | None:
    """Test accuracy per finer label (``split_table``'s ``stratum`` column, e.g. the experts' four defect
    probabilities that ELPV's binary task merges into two classes), one row per finer label with its class,
    images, right answers and accuracy; None when the split table has no label finer than the classes."""
    if "stratum" not in split_table.columns:
        return None
    finer = split_table.set_index("file")["stratum"].reindex(pred["file"])
    if finer.isna().any():
        raise ValueError(f"{int(finer.isna().sum())} predicted file(s) are not in the split table, e.g. "
                         f"{pred['file'][finer.isna().to_numpy()].iloc[0]!r}")
    frame = pd.DataFrame({"stratum": finer.to_numpy(), "class": pred["true"].to_numpy(),
                          "right": (pred["target"] == pred["predicted"]).to_numpy()})
    if frame.groupby("stratum")["class"].nunique().max() == 1 and frame["stratum"].nunique() == frame[
            "class"].nunique():
        return None  # one finer label per class: nothing the classes do not already show
    table = frame.groupby(["stratum", "class"]).agg(images=("right", "size"), right=("right", "sum"))
    table["accuracy"] = table["right"] / table["images"]
    return table.reset_index()


def stratum_note(table: pd.DataFrame) -> str:
    """One sentence on the hardest finer label of `accuracy_by_stratum`'s table against the other test images: is
    the gap beyond chance, allowing for having picked the worst of several labels? Fisher's exact test (a few
    images per label are common), one-sided since the worst was picked, at 5 % divided by the labels (Bonferroni)."""
    from scipy.stats import fisher_exact

    worst = table.loc[table["accuracy"].idxmin()]
    n_rest, right_rest = table["images"].sum() - worst["images"], table["right"].sum() - worst["right"]
    labels = len(table)
    rest = right_rest / n_rest if n_rest else math.nan
    p_value = fisher_exact([[worst["right"], worst["images"] - worst["right"]], [right_rest, n_rest - right_rest]],
                           alternative="less").pvalue if n_rest else 1.0
    beyond = p_value < 0.05 / labels
    return (f"The hardest finer label is {worst['stratum']} (class *{worst['class']}*): {int(worst['right'])} of "
            f"{int(worst['images'])} right ({worst['accuracy']:.2f}), against {rest:.2f} on the other "
            f"{int(n_rest)} test images; "
            + (f"a gap beyond chance, even allowing for having picked the worst of {labels} labels." if beyond else
               f"a gap within what chance gives when the worst of {labels} labels is picked."))


def common_mistakes(pred: pd.DataFrame, shown: int = 5) -> str:
    """One sentence: how many of ``pred``'s images are wrong, and the most common (true, predicted) pair, or the
    pairs that tie for it (at most ``shown`` of them named). ``pred`` has the columns ``true`` and ``pred``."""
    wrong = pred[pred["true"] != pred["pred"]]
    if not len(wrong):
        return f"0 of {len(pred)} test images are wrong."
    common = wrong.groupby(["true", "pred"]).size().sort_values(ascending=False, kind="stable")
    count = int(common.iloc[0])
    top = common[common == count]  # several pairs can share the top count
    pairs = ", ".join(f"*{true}* predicted as *{predicted}*" for true, predicted in top.index[:shown])
    images = f"{count} image{'s' if count != 1 else ''}"
    if len(top) == 1:
        return (f"{len(wrong)} of {len(pred)} test images are wrong; the most common mistake is {pairs} ({images}, "
                f"{count / len(wrong):.0%} of the mistakes).")
    return (f"{len(wrong)} of {len(pred)} test images are wrong; {len(top)} mistakes tie as the most common, "
            f"{images} each: {pairs}" + (", ..." if len(top) > shown else "") + ".")


# ----------------------------------------------------------------------------------------
# ELPV's modules: which cell came from which is not recorded, but the file order hints at it

def neighbour_agreement(labels: Sequence, rounds: int = 1000, seed: int = 0) -> dict:
    """How often consecutive rows share their label (``observed``), and the same for the labels shuffled
    ``rounds`` times (``shuffled``: the mean; ``shuffled_high``: its 97.5th percentile). Far above chance,
    the order carries information: neighbouring images were taken together (one module, one session)."""
    labels = np.asarray(labels)
    if len(labels) < 3:
        raise InputError(f"neighbour agreement needs at least 3 labels, got {len(labels)}")
    rng = np.random.default_rng(seed)
    shuffled = np.array([(p[1:] == p[:-1]).mean() for p in (rng.permutation(labels) for _ in range(rounds))])
    return {"observed": float((labels[1:] == labels[:-1]).mean()), "shuffled": float(shuffled.mean()),
            "shuffled_high": float(np.quantile(shuffled, 0.975))}


def elpv_module_note(table: pd.DataFrame, splits: dict[str, pd.DataFrame], subject_col: str | None,
                     seed: int = 0) -> str:
    """Notebook 02's paragraph on ELPV's modules: the neighbour agreement of the labels in file order, and what
    the split tests on: new cells of seen modules (cell by cell), or unseen blocks (`helpers.data.elpv_blocks`, a
    proxy for a module, with ``subject_col='block'``)."""
    agreement = neighbour_agreement(table.sort_values("file")["label"], seed=seed)
    alike = agreement["observed"] > agreement["shuffled_high"]
    text = (f"In file order, consecutive cells share their label {agreement['observed']:.0%} of the time; with the "
            f"labels shuffled, {agreement['shuffled']:.0%} (97.5th percentile of 1,000 shuffles: "
            f"{agreement['shuffled_high']:.0%}). "
            + ("Neighbouring cells are alike beyond chance, as cells of one module would be. " if alike else
               "Neighbouring cells are no more alike than chance, so the file order says little about modules. "))
    if subject_col is not None:
        n = splits["test"]["subject"].nunique()
        return text + (f"This run splits by `{subject_col}`: the {n} test block{'s' if n != 1 else ''} "
                       f"ha{'ve' if n != 1 else 's'} no cell in train, so the test score is on modules (as far as the "
                       f"blocks follow them) the model never saw. With so few blocks, which ones land in test moves "
                       f"the score a lot: expect wide margins, and compare seeds before reading much into one run.")
    blocks_option = ("To test on unseen blocks of 60 consecutive cells of one type (the table's `block` column, a "
                     "proxy for a module), run the course with `-p subject_col block`; `benchmarks/elpv_modules.py` "
                     "compares the two splits.")
    if not alike:
        return text + "This run splits cell by cell, as Deitsch et al. did. " + blocks_option
    return text + ("This run splits cell by cell, as Deitsch et al. did, so cells of one module land in train and "
                   "test alike: the test score is on new cells of modules the model has seen, which is easier than "
                   "new modules. " + blocks_option)


# ----------------------------------------------------------------------------------------
# Class names the plots' font cannot draw

def _plot_fonts() -> list[str]:
    """The files of the fonts matplotlib draws text with by default: since matplotlib 3.6 a glyph the first lacks
    is taken from the next font named in ``font.family`` (its fallback chain)."""
    from matplotlib import font_manager

    prop = font_manager.FontProperties(family=plt.rcParams["font.family"])
    chain = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # how matplotlib itself finds them
    return [str(path) for path in chain(prop)] if chain else [font_manager.findfont(prop)]


def missing_glyphs(names: Sequence[str]) -> list[str]:
    """The characters of ``names`` that none of matplotlib's default fonts has a glyph for (they plot as empty
    boxes)."""
    from matplotlib.ft2font import FT2Font

    fonts = [FT2Font(path) for path in _plot_fonts()]
    return sorted({ch for name in names for ch in str(name)
                   if not ch.isspace() and all(font.get_char_index(ord(ch)) == 0 for font in fonts)})


def font_note(names: Sequence[str]) -> str:
    """A sentence for notebook 02 when class names use characters the plots cannot draw, else "". The notebooks
    silence matplotlib's warning per missing glyph (dozens per figure), so this is where it is said."""
    missing = missing_glyphs(names)
    if not missing:
        return ""
    fonts = ", ".join(Path(path).stem for path in _plot_fonts())
    return (f"Class names use {len(missing)} character(s) the plots' font ({fonts}) cannot draw, "
            f"e.g. {' '.join(missing[:8])}: figures show them as empty boxes (tables and files keep them). Install "
            f"a font that has them and put it first in `matplotlib.rcParams['font.sans-serif']` (e.g. Noto Sans "
            f"CJK).")
