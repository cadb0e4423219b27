"""The article's size x similarity guide as code: which layer groups to fine-tune.

| data          | similar to ImageNet            | different from ImageNet                  |
|---------------|--------------------------------|------------------------------------------|
| small         | `head` (or `last_n`)           | `initial` / `truncate`                   |
| large         | `last_n` or `full`             | `full` (retrain from the checkpoint)     |

Every strategy works on the layer groups of a `TransferModel` (stem, stage1..N, head,
classifier), never on hand-written layer indices, so it means the same thing for every backbone.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import InputError
from .models import TransferModel, new_classifier

STRATEGIES = ("head", "last_n", "initial", "truncate", "full")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, TransferModel):
        raise TypeError(f"expected a TransferModel from helpers.models.create_model, got {type(model).__name__}")


def set_trainable(model: TransferModel, group_names: list[str]) -> TransferModel:
    """Make exactly the named groups trainable and freeze all others."""
    _check_model(model)
    unknown = sorted(set(group_names) - set(model.group_names))
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown}; the model has {model.group_names}")
    for name, group in model.groups.items():
        group.requires_grad_(name in group_names)
    return model


def trainable_groups(model: TransferModel) -> list[str]:
    """Names of the groups with at least one trainable parameter."""
    return [name for name, group in model.groups.items() if any(p.requires_grad for p in group.parameters())]


def unfreeze_last(model: TransferModel, n: int) -> TransferModel:
    """Also train the last ``n`` groups (counting the classifier); what already trains keeps training.

    Gradual unfreezing only ever adds groups (as fastai's ``freeze_to``): unfreezing the late
    stages of an ``initial`` model must not freeze the early groups it was training.
    """
    _check_model(model)
    if not 1 <= n <= len(model.group_names):
        raise ValueError(f"n must be in 1..{len(model.group_names)} for this model, got {n}")
    return set_trainable(model, sorted(set(trainable_groups(model)) | set(model.group_names[-n:]),
                                       key=model.group_names.index))


def truncation_point(model: TransferModel) -> str:
    """Where ``truncate`` cuts by default: the stage at two thirds of the depth, whose features are past the
    generic edges and textures but before the most ImageNet-specific late stages."""
    stages = [g for g in model.group_names if g.startswith("stage")]
    return stages[max(0, round(2 * len(stages) / 3) - 1)]


def truncate(model: TransferModel, after: str, num_classes: int | None = None, dropout: float = 0.2) -> TransferModel:
    """Cut the network after group ``after`` and put a new pooling head and classifier there.

    Late stages hold the most ImageNet-specific features; for data far from ImageNet, the
    generic early features plus a new head can transfer better (Yosinski et al. 2014).
    """
    _check_model(model)
    names = model.group_names
    if after not in names[:-2]:
        raise ValueError(f"cannot truncate after {after!r}; choose one of {names[:-2]}")
    keep = names[: names.index(after) + 1]
    groups = OrderedDict((n, model.groups[n]) for n in keep)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        probe = torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)  # a model on a GPU too
        channels = model.forward_groups(probe, 0, len(keep)).shape[1]
        model.train(was_training)
    groups["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    groups["classifier"] = new_classifier(channels, num_classes or model.num_classes, dropout)
    cut = TransferModel(groups, model.spec, model.weight_source)
    cut.keep_frozen_eval = model.keep_frozen_eval
    return cut


def apply_strategy(model: TransferModel, strategy: str, n: int = 2, after: str | None = None) -> TransferModel:
    """Freeze ``model`` by one of the guide's strategies and return it (a new one for truncate).

    - ``head``: only the classifier trains (feature extraction) - small & similar data.
    - ``last_n``: the last ``n`` groups before the classifier plus the classifier - large &
      similar data, or small & similar with more budget.
    - ``initial``: the article's "fine-tune initial layers" read literally: the first ``n``
      groups (stem, stage1, ...) plus the classifier train, the middle stays frozen.
    - ``truncate``: the other reading of small & different: keep the generic early layers,
      cut after group ``after`` (default: `truncation_point`, two thirds of the stages) with a
      new head; the kept part is frozen except its last ``n - 1`` groups (``n=1``: only the new
      classifier trains).
    - ``full``: everything trains from the pretrained checkpoint - large & different data.
    """
    _check_model(model)
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    names = model.group_names
    body = names[:-1]  # everything before the classifier
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n!r}")
    if after is not None and strategy != "truncate":
        raise InputError(f"after={after!r} only applies to strategy 'truncate', not {strategy!r}")
    options: dict = {}
    if strategy == "head":
        set_trainable(model, ["classifier"])
    elif strategy == "last_n":
        if not 1 <= n <= len(body):
            raise InputError(f"last_n needs 1 <= n <= {len(body)} for this model, got {n}")
        set_trainable(model, body[-n:] + ["classifier"])
        options = {"n": n}
    elif strategy == "initial":
        if not 1 <= n <= len(body):
            raise InputError(f"initial needs 1 <= n <= {len(body)} for this model, got {n}")
        set_trainable(model, body[:n] + ["classifier"])
        options = {"n": n}
    elif strategy == "truncate":
        after = after or truncation_point(model)
        model = truncate(model, after)
        kept = model.group_names[:-2]
        if not 1 <= n <= len(kept) + 1:
            raise InputError(f"truncate needs 1 <= n <= {len(kept) + 1}, got {n}")
        set_trainable(model, kept[len(kept) - (n - 1):] + ["head", "classifier"] if n > 1 else ["head", "classifier"])
        options = {"after": after, "n": n}
    else:
        set_trainable(model, names)
    model.strategy = {"name": strategy, **options}
    return model


def rebuild_strategy(model: TransferModel, strategy: dict) -> TransferModel:
    """Re-apply a saved ``model.strategy`` (from a checkpoint) to a fresh model."""
    options = {k: v for k, v in strategy.items() if k != "name"}
    return apply_strategy(model, strategy["name"], **options)


def frozen_prefix_length(model: TransferModel) -> int:
    """How many leading groups have no trainable parameter (their output can be cached)."""
    count = 0
    for group in model.groups.values():
        if any(p.requires_grad for p in group.parameters()):
            break
        count += 1
    return min(count, len(model.group_names) - 1)


def trainable_summary(model: TransferModel) -> pd.DataFrame:
    """One row per layer group: parameters, trainable parameters, and whether it trains."""
    _check_model(model)
    rows = []
    for name, group in model.groups.items():
        total = sum(p.numel() for p in group.parameters())
        trainable = sum(p.numel() for p in group.parameters() if p.requires_grad)
        rows.append({"group": name, "parameters": total, "trainable": trainable,
                     "state": "train" if trainable else "frozen"})
    frame = pd.DataFrame(rows)
    total = pd.DataFrame([{"group": "total", "parameters": frame["parameters"].sum(),
                           "trainable": frame["trainable"].sum(), "state": ""}])
    return pd.concat([frame, total], ignore_index=True)


def param_groups(model: TransferModel, lr: float, layer_decay: float = 1.0,
                 weight_decay: float = 0.01) -> list[dict]:
    """Optimizer parameter groups with discriminative (layer-wise decayed) learning rates.

    The classifier gets ``lr``, the group before it ``lr * layer_decay``, the one before that
    ``lr * layer_decay**2`` and so on: early, generic layers move less than late ones
    (Howard & Ruder 2018). Biases and norm weights get no weight decay. Frozen parameters
    are included so that gradual unfreezing can switch them on without a new optimizer.
    """
    _check_model(model)
    if not 0.0 < layer_decay <= 1.0:
        raise InputError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups = []
    names = model.group_names
    for depth, name in enumerate(reversed(names)):
        params = list(model.groups[name].parameters())
        scale = layer_decay ** depth
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for chunk, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if chunk:
                groups.append({"params": chunk, "lr": lr * scale, "weight_decay": wd, "group": name,
                               "lr_scale": scale})
    return groups


# ----------------------------------------------------------------------------------------
# The guide: recommend a strategy, and measure "similar" from the data itself

# Guide thresholds. "Small" is the course's own convention, a rule of thumb rather than a measured
# boundary: under about a thousand images per class, fine-tuning deep layers overfits easily.
SMALL_IMAGES_PER_CLASS = 1000

# "Similar to ImageNet" is measured with the network's own BatchNorm statistics. A BatchNorm
# layer stores the mean and variance its input had over ImageNet (running_mean, running_var);
# data from the same domain gives the same statistics, data from another domain shifts them
# (the observation behind AdaBN, Li et al. 2016, arXiv:1603.04779). `measure_similarity` takes
# the probe's last BatchNorm, on the features the classifier reads (1280 channels for Lite0),
# and asks how far this data's mean of each feature lies from ImageNet's, in ImageNet standard
# deviations: distance = median over channels of ((mu_d - mu) / sigma)^2, and
# similarity = 0.5 ** (distance / SIMILARITY_HALF_DISTANCE), 1 for ImageNet's own statistics.
# Why so narrow: early layers see colour, sharpness and contrast, which grayscale photos and
# upscaled thumbnails change without changing what they show (at the stem, a mean-and-variance
# distance puts grayscale photos 12x further from ImageNet than colour ones; at the last layer
# 1.2x). Feature variances shrink for any blurry input (median variance ratio at the last layer:
# 25 px faces 0.43, ELPV 0.37, MNIST 0.34), so a variance term puts faces next to solar cells.
# The median over features, unlike the mean, is not carried by the few features that shift most.
# Of the variants tried (all BatchNorm layers; early, middle or late stages; with variance terms
# or KL; mean, median or trimmed mean over channels), this one separated the two sides by the
# widest factor (1.67, next 1.58); all the good ones used only the last stages.
#
# Calibration (`python benchmarks/similarity.py --seeds 0 1 --n 100`; probe EfficientNet-Lite0 at
# 224 px with the course's crop; 100 images per set, two seeds of crops and samples; distance ->
# similarity; see benchmarks/GUIDE.md):
#   similar side: ImageNet validation JPEGs (foolbox, 20) 0.018 -> 0.89; everyday-photo crops
#     0.029-0.034 -> 0.81-0.83, grayscale 0.033-0.035 -> 0.80-0.81, 32-48 px thumbnails
#     0.055-0.057 -> 0.70-0.71; CIFAR thumbnails (foolbox, 40) 0.065 -> 0.66; 25 px grayscale
#     faces (skimage lfw_subset, the "200 small face photos") 0.083-0.087 -> 0.58-0.59.
#   open (see benchmarks/GUIDE.md): brick/grass/gravel/moon textures 0.068-0.071 -> 0.64-0.65,
#     similar; Fashion-MNIST 0.120-0.132 -> 0.44-0.47, different.
#   different side: MNIST (foolbox, 20) 0.142 -> 0.41; ELPV cells, uncropped as the course
#     probes them, 0.143-0.145 -> 0.40-0.41; white/pink noise 0.170 -> 0.34; scikit-learn
#     digits 0.335-0.342 -> 0.12.
# SIMILARITY_HALF_DISTANCE = 0.11 is about the geometric mean of the closest pair across the
# boundary (faces 0.087, MNIST and ELPV 0.142): a margin of x1.26 / x1.29 in distance, +0.08 /
# -0.09 in similarity. The faces and the solar cells are the limits; nothing else is closer.
# Held out of the choice (crops of other scikit-image pictures): grayscale photos 0.057,
# similar; retina 0.176, star field 0.187 and printed text 0.121 different (text by x1.1
# only); stained tissue (immunohistochemistry) 0.082, similar: microscopy can pass as photos.
# Few images bias the distance upwards (their mean wanders): in 95 % of random draws of 16
# images, photos stay below 0.06 and faces below 0.106, ELPV above 0.128; 4 images are not
# enough (faces up to 0.14). Score at least SIMILARITY_MIN_IMAGES.
# The classifier's entropy, used before, failed here: faces scored 0.32 on it, level with noise
# (0.31) and MNIST (0.30), below Fashion-MNIST (0.39-0.41): ImageNet has no "face" class.
# The scale belongs to the probe: these numbers hold for EfficientNet-Lite0 only.
SIMILARITY_THRESHOLD = 0.5
SIMILARITY_HALF_DISTANCE = 0.11
SIMILARITY_PROBE = "efficientnet_lite0"
SIMILARITY_MIN_IMAGES = 16
# Scores of known kinds of data (seed 0 above), to place a new dataset among them in a plot.
SIMILARITY_REFERENCE = {"ImageNet validation photos": 0.89, "everyday photos": 0.83, "grayscale photos": 0.80,
                        "32-48 px thumbnails": 0.70, "25 px grayscale faces": 0.59, "Fashion-MNIST": 0.44,
                        "ELPV solar cells": 0.40, "noise": 0.34, "8x8 digits": 0.12}


def recommend(n_train: int, n_classes: int, similarity: float | str) -> tuple[str, str]:
    """The article's 2 x 2 guide: (strategy, one-paragraph rationale).

    ``similarity`` is "similar", "different", or a score from `measure_similarity`
    (similar when >= ``SIMILARITY_THRESHOLD``).
    """
    if n_train < 1 or n_classes < 2:
        raise ValueError(f"need n_train >= 1 and n_classes >= 2, got {n_train}, {n_classes}")
    if isinstance(similarity, str):
        if similarity not in ("similar", "different"):
            raise ValueError(f"similarity must be 'similar', 'different' or a score, got {similarity!r}")
        similar = similarity == "similar"
        sim_text = similarity
    else:
        similar = float(similarity) >= SIMILARITY_THRESHOLD
        sim_text = (f"{'similar' if similar else 'different'} (measured similarity {float(similarity):.2f}, "
                    f"threshold {SIMILARITY_THRESHOLD})")
    per_class = n_train / n_classes
    small = per_class < SMALL_IMAGES_PER_CLASS
    size_text = (f"{'small' if small else 'large'} ({n_train} training images, {per_class:.0f} per class on "
                 f"average; "
                 f"'small' is under {SMALL_IMAGES_PER_CLASS} per class)")
    if small and similar:
        strategy = "head"
        why = ("the pretrained features already describe this kind of image, and with few examples "
               "fine-tuning deep layers would overfit: train only a new classifier (feature extraction); "
               "try last_n next if the budget allows.")
    elif small:
        strategy = "truncate"
        why = ("the last stages hold the most ImageNet-specific features, which the guide expects to fit this "
               "data poorly, and there are too few images to retrain them: keep the earlier layers (edges, "
               "textures, simple parts), cut the network after the stage at two thirds of its depth and fit a new "
               "head there. That is a hypothesis: notebook 03 tests it against 'initial' (the article's 'fine-tune "
               "the initial layers' read literally) and the other strategies.")
    elif similar:
        strategy = "last_n"
        why = ("with plenty of similar data, the late layers can be adapted safely: fine-tune the last "
               "groups (or everything, with discriminative learning rates).")
    else:
        strategy = "full"
        why = ("with plenty of data that looks unlike ImageNet, retrain the whole network starting from "
               "the checkpoint: the pretrained weights are a better start than random ones.")
    return strategy, f"Data is {size_text} and {sim_text}, so {strategy!r}: {why}"


def _last_batchnorm(model: TransferModel) -> nn.modules.batchnorm._BatchNorm | None:
    """The last BatchNorm layer before the classifier that holds running (ImageNet) statistics."""
    last = None
    for name in model.group_names[:-1]:
        for module in model.groups[name].modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                last = module
    return last


def _shift(mean: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Median over channels (last dim) of the squared shift of ``mean`` from the stored mean, in
    stored standard deviations. torch's median: with an even number of channels, the lower of the two
    middle values (the calibrated threshold was measured with it)."""
    z = (mean - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
    return (z ** 2).median(-1).values


@torch.no_grad()
def measure_similarity(images: torch.Tensor | torch.utils.data.DataLoader, model: TransferModel | None = None,
                       device: str | torch.device = "cpu") -> dict:
    """How ImageNet-like a set of images is, judged by the pretrained network's BatchNorm statistics.

    The images go through the probe. At its last BatchNorm layer (the features the classifier
    reads) the mean of each feature over these images is compared with the ImageNet mean the layer
    stored: ``activation_distance`` = median over features of ((mean - ImageNet mean) / ImageNet
    std)^2, and ``similarity`` = 0.5 ** (distance / SIMILARITY_HALF_DISTANCE), in (0, 1]: 1 for
    ImageNet's own statistics, 0.5 at the calibrated boundary (see the comment at
    SIMILARITY_THRESHOLD). Score at least ``SIMILARITY_MIN_IMAGES`` images: the mean of fewer
    wanders, which lowers the score.

    ``per_image_similarity`` applies the formula to each image alone. One image's features wander
    further from the ImageNet mean than a dataset's average does, so these values are lower than
    the dataset's score and squeezed together (ImageNet photos themselves get about 0.3): use them
    to compare images with each other and with reference photos, not with the threshold. The
    ImageNet classifier's confidence is returned too (``mean_top1_probability``,
    ``mean_normalized_entropy``, and ``entropy_similarity`` = 1 - mean normalized entropy, the
    course's earlier measure).

    ``images`` is a batch tensor or a DataLoader (any iterable) of (images, labels), preprocessed
    for ``model`` (default: the EfficientNet-Lite0 probe the threshold was calibrated with, whose
    preprocessing is `eval_transform(BACKBONES["efficientnet_lite0"])`). ``model`` must be the
    untouched pretrained network, `create_model(name, None)`: its statistics are the reference.
    """
    if model is None:
        from .models import create_model

        model = create_model(SIMILARITY_PROBE, None)
    _check_model(model)
    if not model.imagenet_classifier:
        raise ValueError("measure_similarity needs the untouched pretrained ImageNet network, "
                         "create_model(name, None): its BatchNorm statistics and 1000-class head are the reference")
    layer = _last_batchnorm(model)
    if layer is None:
        raise ValueError(f"measure_similarity compares features with stored BatchNorm statistics, and "
                         f"{model.spec.name} has no BatchNorm layer; use {SIMILARITY_PROBE!r}")
    if model.spec.name != SIMILARITY_PROBE:
        import warnings

        warnings.warn(f"SIMILARITY_THRESHOLD was calibrated with {SIMILARITY_PROBE}; with {model.spec.name} the "
                      f"scores are on another scale", stacklevel=2)
    model.eval().to(device)
    means: list[torch.Tensor] = []  # per image: the spatial mean of each channel at the layer's input

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        means.append((x.double().mean((2, 3)) if x.ndim == 4 else x.double()).cpu())

    handle = layer.register_forward_pre_hook(record)
    batches = [images] if isinstance(images, torch.Tensor) else (b[0] for b in images)
    top1, entropy = [], []
    try:
        for batch in batches:
            probs = model(batch.to(device)).float().softmax(1)
            top1.append(probs.max(1).values.cpu())
            entropy.append((-(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(1000)).cpu())
    finally:
        handle.remove()
    if not top1:
        raise ValueError("measure_similarity got no images")
    top1, entropy = torch.cat(top1).numpy(), torch.cat(entropy).numpy()
    per_image = torch.cat(means)
    distance = float(_shift(per_image.mean(0), layer))  # every image weighs the same, whatever its size
    per_image_distance = _shift(per_image, layer).numpy()
    similarity = float(0.5 ** (distance / SIMILARITY_HALF_DISTANCE))
    return {"similarity": similarity, "similar": bool(similarity >= SIMILARITY_THRESHOLD),
            "threshold": SIMILARITY_THRESHOLD, "images": len(top1), "activation_distance": distance,
            "per_image_similarity": np.round(0.5 ** (per_image_distance / SIMILARITY_HALF_DISTANCE), 4),
            "mean_top1_probability": float(top1.mean()), "mean_normalized_entropy": float(entropy.mean()),
            "entropy_similarity": float(1.0 - entropy.mean())}
