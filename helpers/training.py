"""The training loop: honest on a 2-core laptop, fast on a GPU, resumable anywhere.

Read it top to bottom:
- `TrainConfig`: every training setting, checked in one place and saved whole with each run;
- `train_one_epoch` and `evaluate`: the loop you would write by hand (notebook 04 does);
- `fit`: runs that loop for a number of epochs and adds what a real run needs: the learning-rate
  schedule, the frozen-prefix cache (`helpers.cache`), early stopping, an optional weight average,
  the best and the last checkpoint after every epoch, and exact resume. Under ``torchrun`` it
  trains in several processes (`helpers.distributed`); the loop itself does not change.

Determinism: every epoch reseeds all random number generators from (seed, epoch), so an epoch's
shuffling, augmentation and dropout do not depend on what ran before it. That is what lets a run
killed at any point resume to exactly the same result on the CPU.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.utils.class_weight import compute_class_weight
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from . import cache as feature_cache
from . import distributed
from .checkpoint import atomic_save, describe_model, load_checkpoint
from .data import targets_of
from .errors import InputError
from .files import write_csv, write_json
from .freezing import param_groups, unfreeze_last
from .metrics import METRICS, score
from .models import TransferModel
from .runtime import (amp_dtype, autocast, make_loader, pick_device, progress_default, seed_everything,
                      to_device, with_progress)
from .transforms import Preprocessing, preprocessing_of

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or infinity; the last good checkpoint is left untouched."""


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be {'None or ' if allow_none else ''}a positive integer, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Checked when created; saved in ``fit.json`` and ``last.pt``,
    and a resumed run must match it field by field."""

    epochs: int = 5
    lr: float = 1e-3  # of the classifier; earlier groups get lr * layer_decay ** depth
    batch_size: int = 32  # per process under torchrun: the effective batch is world_size * batch_size
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "cosine"  # linear warm-up, then cosine decay to 0 ("constant": warm-up, then flat)
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    class_weights: str | tuple[float, ...] | None = None  # "balanced": inverse class frequency
    metric: str = "accuracy"  # what selects the best epoch
    patience: int | None = None  # stop after this many epochs without improvement
    seed: int = 0
    amp: bool = True  # mixed precision for training steps on CUDA (bf16, or fp16 with a GradScaler); validation is fp32
    channels_last: bool = True
    cache: str | bool = "auto"
    cache_views: int = 1
    layer_decay: float = 1.0
    unfreeze_schedule: dict[int, int] = field(default_factory=dict)  # {epoch: also train the last n groups}
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    num_workers: int | None = None
    freeze_batchnorm: bool = False  # all BatchNorm layers keep their stored statistics (inference mode)
    sync_batchnorm: bool = False  # under torchrun on GPUs: BatchNorm statistics over all processes' batches

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "cache_views"):
            _positive_int(name, getattr(self, name))
        _positive_int("patience", self.patience, allow_none=True)
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr < 10:
            raise InputError(f"lr must be a positive number below 10, got {self.lr!r}")
        for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("metric", METRICS),
                            ("cache", ("auto", True, False))):
            if getattr(self, name) not in valid:
                raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(valid)}")
        checks = (("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                  ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)"),
                  ("layer_decay", 0.0 < self.layer_decay <= 1.0, "in (0, 1]"),
                  ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "None or > 0"),
                  ("ema_decay", self.ema_decay is None or (isinstance(self.ema_decay, float)
                                                           and 0.0 < self.ema_decay < 1.0), "None or in (0, 1)"),
                  ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool), "an integer"),
                  ("sync_batchnorm", isinstance(self.sync_batchnorm, bool), "True or False"),
                  ("num_workers", self.num_workers is None or (isinstance(self.num_workers, int)
                                                               and self.num_workers >= 0), "None or >= 0"))
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        weights = self.class_weights
        if isinstance(weights, str) and weights != "balanced":
            raise InputError(f"class_weights must be 'balanced', a tensor or None, got {weights!r}")
        if weights is not None and not isinstance(weights, str):  # a tensor, array or list: store plain floats
            object.__setattr__(self, "class_weights", tuple(float(w) for w in torch.as_tensor(weights).flatten()))
            bad = [w for w in self.class_weights if not (math.isfinite(w) and w > 0)]
            if bad:  # a batch of weight-0 classes only has loss 0/0; under torchrun the other processes would wait
                raise InputError(f"class_weights must all be positive and finite, got {list(self.class_weights)}; "
                                 f"to leave a class out, leave its images out of the table")
        schedule = {int(k): int(v) for k, v in dict(self.unfreeze_schedule).items()}
        for epoch, n in schedule.items():
            if not 1 <= epoch <= self.epochs or n < 1:
                raise InputError(f"unfreeze_schedule entry {epoch}: {n} is invalid; keys are epochs 1..{self.epochs}, "
                                 f"values numbers of groups >= 1")
        object.__setattr__(self, "unfreeze_schedule", dict(sorted(schedule.items())))


# ----------------------------------------------------------------------------------------
# The loop


def _loss_weight(criterion: nn.Module, y: torch.Tensor) -> float:
    """What a batch's mean loss is averaged over: its size, or with class weights the sum of its images'
    weights (how ``CrossEntropyLoss`` normalizes), so that the epoch's loss is the weighted mean over all
    images whatever the batches held."""
    weight = getattr(criterion, "weight", None)
    return float(weight[y].sum()) if weight is not None else float(len(y))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    device: torch.device, *, scaler: torch.amp.GradScaler | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    dtype: torch.dtype | None = None, channels_last: bool = True,
                    max_grad_norm: float | None = None, ema: WeightAverage | None = None, progress: bool = False,
                    desc: str = "train") -> dict:
    """One pass over ``loader``: forward (under autocast), loss, backward (through the scaler),
    step; the scheduler steps per batch. Returns the mean loss and accuracy."""
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # fp16 needs one; else a no-op
    model.train()
    loss_sum, weight_sum, correct, seen = 0.0, 0.0, 0, 0
    for x, y in with_progress(loader, desc, progress):
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        weight = _loss_weight(criterion, y)
        loss_sum += loss.item() * weight
        weight_sum += weight
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    # The totals beside the means let several processes pool their epochs exactly (`Distributed.pool`).
    return {"loss": loss_sum / weight_sum, "accuracy": correct / seen, "loss_weight": weight_sum, "images": seen}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, *,
             dtype: torch.dtype | None = None, channels_last: bool = True) -> dict:
    """Mean loss (weighted, with class weights), targets and predicted classes of ``model`` over ``loader``,
    in eval mode."""
    model.eval()
    loss_sum, weight_sum, targets, predictions = 0.0, 0.0, [], []
    for x, y in loader:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        weight = _loss_weight(criterion, y)
        loss_sum += criterion(logits.float(), y).item() * weight
        weight_sum += weight
        targets.append(y.cpu())
        predictions.append(logits.argmax(1).cpu())
    targets, predictions = torch.cat(targets).numpy(), torch.cat(predictions).numpy()
    return {"loss": loss_sum / weight_sum, "loss_weight": weight_sum, "targets": targets, "predictions": predictions}


# ----------------------------------------------------------------------------------------
# The parts fit builds


class WeightAverage:
    """An exponential moving average of the weights (timm's ``ModelEmaV3``) that counts its steps,
    so its warm-up (decay 0.97 after 100 steps, 0.99 after 450, capped at ``decay``) survives a resume."""

    def __init__(self, model: nn.Module, decay: float, steps: int = 0):
        self.average, self.steps = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=3 / 4), steps

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def update(self, model: nn.Module) -> None:
        self.steps += 1
        model = distributed.Distributed.unwrap(model)  # under torchrun fit trains a DDP wrapper
        self.average.update(getattr(model, "model", model), step=self.steps)  # GroupsFrom wraps the model


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: linear warm-up, then cosine decay (or flat); or one-cycle."""
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, pct_start=max(warmup / total, 0.05))
    after = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
             if config.schedule == "cosine" else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=0))
    if warmup == 0:
        return after
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def make_criterion(config: TrainConfig, model: TransferModel, train_set: Dataset,
                   device: torch.device) -> nn.Module:
    """Cross-entropy with the configured label smoothing and class weights."""
    weights = config.class_weights
    if weights == "balanced":
        targets = np.asarray(targets_of(train_set))
        present = np.unique(targets)
        balanced = np.ones(model.num_classes, dtype=np.float32)
        balanced[present] = compute_class_weight("balanced", classes=present, y=targets)
        weights = balanced
    weights = torch.as_tensor(weights, dtype=torch.float32, device=device) if weights is not None else None
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)


def make_optimizer(model: TransferModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over every group (frozen ones too, so unfreezing needs no new optimizer)."""
    groups = param_groups(model, config.lr, config.layer_decay, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


# ----------------------------------------------------------------------------------------
# fit


def _check_inputs(model: TransferModel, train_set: Dataset, val_set: Dataset, config: TrainConfig,
                  meta: dict) -> None:
    """What would otherwise fail late: after caching, mid-run, or when a checkpoint is loaded."""
    if not isinstance(model, TransferModel):
        raise TypeError(f"fit needs a TransferModel from helpers.models.create_model, got {type(model).__name__}")
    if len(train_set) == 0 or len(val_set) == 0:
        raise InputError(f"empty dataset: {len(train_set)} training and {len(val_set)} validation images")
    train_classes, val_classes = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train_classes is not None and val_classes is not None and list(train_classes) != list(val_classes):
        raise ValueError(f"the training set's classes {list(train_classes)} differ from the validation set's "
                         f"{list(val_classes)}: build the validation set with classes=train_set.classes")
    if train_classes is not None and len(train_classes) != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} outputs but the training set has {len(train_classes)} "
                         f"classes {list(train_classes)}: create the model with num_classes={len(train_classes)}")
    if isinstance(config.class_weights, tuple) and len(config.class_weights) != model.num_classes:
        raise ValueError(f"class_weights needs {model.num_classes} values (one per class), "
                         f"got shape ({len(config.class_weights)},)")
    if config.class_weights == "balanced" and targets_of(train_set) is None:
        raise ValueError(f"class_weights='balanced' counts the training labels, but a {type(train_set).__name__} "
                         f"has no `targets`: use an ImageDataset (or a Subset of one), or give one weight per class")
    groups = len(model.group_names)
    for epoch, n in config.unfreeze_schedule.items():
        if n > groups:
            raise InputError(f"unfreeze_schedule entry {epoch}: {n} is invalid; keys are epochs 1..{config.epochs}, "
                             f"values numbers of groups 1..{groups} (of {model.group_names})")
    _check_plain(meta, "meta")
    clash = sorted(set(meta) & {f.name for f in fields(Preprocessing)})
    if clash:
        raise ValueError(f"meta holds preprocessing settings {clash}: pass preprocessing=Preprocessing(...) "
                         f"(or build the validation transform with helpers.transforms.eval_transform)")


def _check_plain(value, where: str) -> None:
    """Checkpoints load with weights_only=True, which only accepts plain Python values: a numpy
    number or a Path in ``meta`` would be saved fine and then make every checkpoint unloadable."""
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where} keys must be strings, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__} ({value!r}); checkpoints store only str, int, float, "
                    f"bool, None, lists and dicts (convert it, e.g. float(x) or str(path))")


def _identity(model: TransferModel, train_set: Dataset, val_set: Dataset,
              preprocessing: Preprocessing | None) -> dict:
    """What every checkpoint of this run says about the model and its inputs."""
    preprocessing = preprocessing or preprocessing_of(val_set)
    if preprocessing is None:
        raise ValueError("fit writes checkpoints that must say how images were prepared, and cannot tell from "
                         "the validation set: build its transform with helpers.transforms.eval_transform, or "
                         "pass preprocessing=Preprocessing(...)")
    size = tuple(val_set[0][0].shape[-2:])
    if size != (preprocessing.image_size,) * 2:
        raise ValueError(f"validation images are {size[0]}x{size[1]} px but the preprocessing says "
                         f"{preprocessing.image_size} px")
    classes = list(getattr(train_set, "classes", None) or [str(i) for i in range(model.num_classes)])
    return describe_model(model, classes, preprocessing)


@dataclass
class _Run:
    """The mutable state of one fit: history, best score, and what resume restores."""

    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    bad_epochs: int = 0
    start_epoch: int = 1
    best_state: dict | None = None  # best weights in memory, when there is no out_dir


def _check_resumable(path: Path, identity: dict, config: TrainConfig, world_size: int) -> dict:
    """``last.pt``'s state, if its model, preprocessing, every training setting and the number of
    processes match this run."""
    state = load_checkpoint(path)
    then = state.get("world_size", 1)
    if then != world_size:  # the shares, batches and steps per epoch all depend on it
        raise InputError(f"cannot resume from {path}: it was trained by {then} process(es), this run has "
                         f"{world_size}; resume with the same number (torchrun --nnodes x --nproc_per_node), "
                         f"or use a new out_dir to start over")
    differences = []
    for key in (k for k in identity if k != "format_version"):
        if key == "preprocessing":  # name the setting inside it (image_size, crop_pct, ...)
            differences += [(name, value, identity[key][name]) for name, value in state[key].items()
                             if value != identity[key].get(name)]
        elif state[key] != identity[key]:
            differences.append((key, state[key], identity[key]))
    if differences:
        name, then, now = differences[0]
        raise InputError(f"cannot resume from {path}: {name} is {then!r} there but {now!r} now")
    # A setting added after the checkpoint was written had its default value there.
    saved = {**asdict(TrainConfig()), **state["config"]}
    changed = [f"{k} is {saved.get(k)!r} there but {v!r} now" for k, v in asdict(config).items()
               if saved.get(k) != v]
    if changed:
        raise InputError(f"cannot resume from {path}: training settings differ: " + ", ".join(changed)
                         + " (use the same settings, or a new out_dir to start over)")
    return state


def _resume(state: dict, run: _Run, config: TrainConfig, model: TransferModel, parts: dict,
            steps_per_epoch: int) -> None:
    """Continue where ``last.pt`` stopped: weights, optimizer, schedule, scaler, average, history."""
    for epoch in range(1, state["epoch"] + 1):  # re-apply the unfreezing that already happened
        if epoch in config.unfreeze_schedule:
            unfreeze_last(model, config.unfreeze_schedule[epoch])
    model.load_state_dict(state["model"])
    for name in ("optimizer", "scheduler", "scaler"):
        parts[name].load_state_dict(state[name])
    if parts["ema"] is not None:
        parts["ema"].module.load_state_dict(state["ema"])
        parts["ema"].steps = state["epoch"] * steps_per_epoch
    run.history, run.best_score, run.bad_epochs = list(state["history"]), state["best_score"], state["bad_epochs"]
    run.start_epoch = state["epoch"] + 1


# last.pt's entries that only resume needs; the rest, with the kept weights, is what best.pt holds.
_RESUME_ONLY = ("ema", "config", "optimizer", "scheduler", "scaler", "history", "best_score", "bad_epochs",
                "world_size")


def _repair_best(out: Path, state: dict) -> None:
    """Rewrite ``best.pt`` from ``last.pt``'s ``state`` when the last finished epoch improved but ``best.pt`` is
    not that epoch's: the run was killed before writing it (`_save` writes ``last.pt`` first), or it is damaged.
    A ``best.pt`` of a later epoch than ``last.pt``'s, which only the old write order could leave, is named."""
    best = out / "best.pt"
    try:
        best_epoch = load_checkpoint(best)["epoch"] if best.is_file() else None
    except InputError:  # damaged (cut off by a full disk, say): rewritten below when last.pt holds its weights
        best_epoch = None
    if state["bad_epochs"] == 0 and best_epoch != state["epoch"]:
        payload = {k: v for k, v in state.items() if k not in _RESUME_ONLY}
        atomic_save({**payload, "model": state.get("ema", state["model"])}, best)  # the weights validated
    elif best_epoch is not None and best_epoch > state["epoch"]:
        warnings.warn(f"{best} holds epoch {best_epoch}, later than {out / 'last.pt'} (epoch {state['epoch']}): "
                      f"an older version was stopped between writing the two. Resume repeats that epoch; if it "
                      f"does not improve this time, the weights returned as the best are the stopped run's",
                      stacklevel=3)


def _validate(model: TransferModel, net: nn.Module, parts: dict, loader: DataLoader, config: TrainConfig,
              device: torch.device, ctx: distributed.Distributed) -> dict:
    """Validation scores of the weights we keep (the average, if any) and, beside them, the raw ones.
    Under torchrun each process evaluates its share and the scores are computed from all of them.

    Always in fp32, whatever precision the training steps use: the floor, the metrics, the export and
    `helpers.predict` all score in fp32, and a bf16 forward flips a few answers, so a best epoch picked (or a
    score quoted) under autocast could disagree with the same model's score everywhere else."""
    row = {}
    start = getattr(net, "start", 0)  # net is the model, or its groups after the cached prefix
    candidates = [("val", parts["ema"].module.tail(start) if parts["ema"] is not None else net)]
    if parts["ema"] is not None:
        candidates.append(("raw_val", net))
    for prefix, candidate in candidates:
        result = ctx.gather(evaluate(candidate, loader, parts["criterion"], device, dtype=None,
                                     channels_last=config.channels_last))
        if not math.isfinite(result["loss"]):  # e.g. weights blown up by the last step: never save them
            raise NonFiniteLossError(f"validation loss became {result['loss']}")
        row[f"{prefix}_loss"] = result["loss"]
        row[f"{prefix}_accuracy"] = score("accuracy", result["targets"], result["predictions"])
        if config.metric != "accuracy":
            row[f"{prefix}_{config.metric}"] = score(config.metric, result["targets"], result["predictions"])
    return row


def _save(out: Path, run: _Run, epoch: int, improved: bool, identity: dict, meta: dict, config: TrainConfig,
          model: TransferModel, parts: dict, summary: dict) -> None:
    """``last.pt`` (everything resume needs), then ``best.pt`` when the epoch improved, history and fit.json.

    In that order: a run killed between the two leaves a ``last.pt`` that knows its epoch improved and holds its
    weights, so resume can rewrite the missing ``best.pt`` (`_repair_best`). The other order would leave a
    ``best.pt`` of an epoch that resume runs again, which on a GPU (not bit-reproducible) can score differently."""
    kept = parts["ema"].module if parts["ema"] is not None else model
    payload = {**identity, "meta": meta, "epoch": epoch, "score": run.history[-1][f"val_{config.metric}"],
               "metric": config.metric, "model": kept.state_dict()}
    atomic_save({**payload, "model": model.state_dict(),
                 **({"ema": parts["ema"].module.state_dict()} if parts["ema"] is not None else {}),
                 "config": asdict(config), "optimizer": parts["optimizer"].state_dict(),
                 "scheduler": parts["scheduler"].state_dict(), "scaler": parts["scaler"].state_dict(),
                 "history": run.history, "best_score": run.best_score, "bad_epochs": run.bad_epochs,
                 **({"world_size": summary["processes"]} if "processes" in summary else {})}, out / "last.pt")
    if improved:
        atomic_save(payload, out / "best.pt")
    write_csv(pd.DataFrame(run.history), out / "history.csv")
    write_json(out / "fit.json", {**summary, "best_score": run.best_score, "config": asdict(config)})


def _out_of_memory(batch_size: int, image_size: int) -> RuntimeError:
    return RuntimeError(f"the GPU ran out of memory at batch_size={batch_size} and image size {image_size}: "
                        f"try a smaller batch_size (e.g. {max(1, batch_size // 2)}) or image_size, or a "
                        f"strategy that trains fewer layers")


def fit(model: TransferModel, train_set: Dataset, val_set: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | os.PathLike | None = None, resume: bool = False, device: str | torch.device | None = None,
        progress: bool | None = None, restore_best: bool = True, meta: dict | None = None,
        preprocessing: Preprocessing | None = None, **settings) -> pd.DataFrame:
    """Train ``model`` (already frozen by `apply_strategy`) and return the history, one row per epoch.

    Settings come as a `TrainConfig` or as its fields (``fit(model, train, val, epochs=3, lr=3e-4)``).
    With ``out_dir``, writes ``best.pt``, ``last.pt``, ``history.csv`` and ``fit.json`` there after every
    epoch, and ``resume=True`` continues from ``last.pt``. Checkpoints store the `Preprocessing` of
    the validation set's transform (or ``preprocessing``). ``meta`` (plain values) is stored too.
    Columns: epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy[, val_<metric>][, raw_val_*
    under ``ema_decay``], seconds; ``history.attrs`` holds the run's summary (device, cache, times).

    Under ``torchrun`` every process calls fit with the same arguments; ``batch_size`` is then per
    process, rank 0 alone writes files and shows progress, and ``out_dir`` must be a folder every
    process can read (``helpers.distributed`` says what else changes).
    """
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"fit got unknown setting(s) {unknown}; the settings are TrainConfig's fields: "
                        f"{[f.name for f in fields(TrainConfig)]}")
    config = replace(config or TrainConfig(), **settings)
    progress = progress_default() if progress is None else progress  # None: on, unless TL_PROGRESS=0
    meta = dict(meta or {})
    _check_inputs(model, train_set, val_set, config, meta)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where last.pt is)")
    ctx = distributed.context()
    if len(val_set) < ctx.world_size:
        raise InputError(f"{ctx.world_size} processes need at least as many validation images (one share each), "
                         f"got {len(val_set)}")
    out = Path(out_dir) if out_dir is not None else None
    identity = _identity(model, train_set, val_set, preprocessing) if out is not None else {}
    device = ctx.device(pick_device(device))
    dtype = amp_dtype(device) if config.amp else None
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    image_size = train_set[0][0].shape[-1]
    state = (_check_resumable(out / "last.pt", identity, config, ctx.world_size)
             if resume and (out / "last.pt").is_file() else None)
    model.freeze_batchnorm = config.freeze_batchnorm
    try:
        return _fit(model, train_set, val_set, config, out, state, device, dtype, progress and ctx.is_main,
                    restore_best, meta, identity, ctx)
    except torch.cuda.OutOfMemoryError as err:
        raise _out_of_memory(config.batch_size, image_size) from err
    finally:
        model.freeze_batchnorm = False


def _fit(model: TransferModel, train_set: Dataset, val_set: Dataset, config: TrainConfig, out: Path | None,
         state: dict | None, device: torch.device, dtype: torch.dtype | None, progress: bool, restore_best: bool,
         meta: dict, identity: dict, ctx: distributed.Distributed) -> pd.DataFrame:
    prefix, views = feature_cache.plan(model, train_set, config.cache, config.cache_views, config.unfreeze_schedule)
    # Under torchrun each process caches, and validates on, its own fixed share (the whole set otherwise).
    train_share, val_share = ctx.shard(train_set, pad=True), ctx.shard(val_set, pad=False)
    cached = feature_cache.build(model, train_share, val_share, prefix, views, seed=ctx.seed(config.seed),
                                 batch_size=config.batch_size, device=device, dtype=dtype,
                                 channels_last=config.channels_last, num_workers=config.num_workers,
                                 progress=progress, processes=ctx.local_world_size) if prefix else None
    net = model.tail(prefix)  # the groups that train: all of them, or those after the cached prefix
    if config.sync_batchnorm:
        ctx.sync_batchnorm(net, device)

    # A last batch of one image would make a training-mode BatchNorm fail (1x1 maps) or learn from one image.
    drop_last = len(train_share) % config.batch_size == 1 and len(train_share) > config.batch_size

    def train_loader(epoch: int) -> DataLoader:  # reshuffled from (seed, epoch): the same after a resume
        seed = config.seed * 1000 + epoch
        if cached:
            return make_loader(TensorDataset(*cached.train_view(epoch)), config.batch_size, True, device, seed=seed,
                               num_workers=0, drop_last=drop_last)
        return make_loader(train_set, config.batch_size, True, device, seed=ctx.seed(seed),
                           num_workers=config.num_workers, sampler=ctx.sampler(train_set, config.seed * 1000, epoch),
                           drop_last=drop_last)

    val_loader = make_loader(TensorDataset(*cached.val) if cached else val_share, 2 * config.batch_size, False,
                             device, num_workers=0 if cached else config.num_workers)
    steps_per_epoch = (len(train_share) // config.batch_size if drop_last
                       else math.ceil(len(train_share) / config.batch_size))
    optimizer = make_optimizer(model, config)
    parts = {"criterion": make_criterion(config, model, train_set, device), "optimizer": optimizer,
             "scheduler": make_scheduler(optimizer, config, steps_per_epoch),
             "scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
             "ema": WeightAverage(model, config.ema_decay) if config.ema_decay else None}
    run = _Run()
    if state is not None:
        _resume(state, run, config, model, parts, steps_per_epoch)
        if ctx.is_main:
            _repair_best(out, state)
    wrapped = ctx.wrap(net, device)  # after resume, which may have unfrozen groups
    summary = {"device": str(device), "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
               "channels_last": config.channels_last, "cached": cached is not None,
               "cached_groups": model.group_names[:prefix], "cache_views": views or 1,
               "cache_seconds": round(cached.seconds, 2) if cached else 0.0,
               "train_images": len(train_set), "val_images": len(val_set), "finished": False,
               **({"processes": ctx.world_size} if ctx.enabled else {})}
    bar = tqdm(range(run.start_epoch, config.epochs + 1), desc="epochs", disable=not progress,
               initial=run.start_epoch - 1, total=config.epochs)
    for epoch in bar:
        if config.patience is not None and run.bad_epochs >= config.patience:
            break
        if epoch in config.unfreeze_schedule:
            unfreeze_last(model, config.unfreeze_schedule[epoch])
            wrapped = ctx.wrap(net, device)  # DDP averages only the parameters that trained when it was built
        row = _epoch(epoch, model, wrapped, train_loader(epoch), val_loader, parts, config, device, dtype, progress,
                     out, ctx)
        run.history.append(row)
        current = row[f"val_{config.metric}"]
        improved = current > run.best_score
        run.best_score, run.bad_epochs = (current, 0) if improved else (run.best_score, run.bad_epochs + 1)
        if improved and out is None and restore_best:
            kept = parts["ema"].module if parts["ema"] is not None else model
            run.best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        bar.set_postfix({"train_loss": f"{row['train_loss']:.4f}", f"val_{config.metric}": f"{current:.3f}"})
        if out is not None and ctx.is_main:
            _save(out, run, epoch, improved, identity, meta, config, model, parts, summary)
        ctx.barrier()  # the others read rank 0's checkpoints (restore_best), so they wait for them
    return _finish(model, run, parts, config, out, restore_best, summary, cached, ctx)


def _epoch(epoch: int, model: TransferModel, net: nn.Module, loader: DataLoader, val_loader: DataLoader,
           parts: dict, config: TrainConfig, device: torch.device, dtype: torch.dtype | None, progress: bool,
           out: Path | None, ctx: distributed.Distributed) -> dict:
    """Train one epoch, validate, and return the history row (the same in every process)."""
    started = time.perf_counter()
    seed_everything(ctx.seed(config.seed * 1000 + epoch))
    optimizer = parts["optimizer"]
    lr = optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1].get("lr_scale", 1.0)
    try:
        trained = train_one_epoch(net, loader, optimizer, ctx.global_mean(parts["criterion"]), device,
                                  scaler=parts["scaler"],
                                  scheduler=parts["scheduler"], dtype=dtype, channels_last=config.channels_last,
                                  max_grad_norm=config.max_grad_norm, ema=parts["ema"], progress=progress,
                                  desc=f"epoch {epoch}")
        trained = ctx.pool(trained)
        ctx.sync_buffers(model, *([parts["ema"].module] if parts["ema"] is not None else []))
        row = {"epoch": epoch, "lr": lr, "train_loss": trained["loss"], "train_accuracy": trained["accuracy"],
               **_validate(model, ctx.unwrap(net), parts, val_loader, config, device, ctx)}
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err} in epoch {epoch}; lower the learning rate (now {config.lr}) or set "
                                 f"max_grad_norm. The last good checkpoint is unchanged"
                                 + (f" in {out}" if out else "")) from None
    row["seconds"] = time.perf_counter() - started
    return {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}


def _finish(model: TransferModel, run: _Run, parts: dict, config: TrainConfig, out: Path | None,
            restore_best: bool, summary: dict, cached, ctx: distributed.Distributed) -> pd.DataFrame:
    """Hand back the best weights (or the average), write the final summary, return the history."""
    if restore_best and out is not None and (out / "best.pt").is_file():
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    elif restore_best and run.best_state is not None:
        model.load_state_dict(run.best_state)
    elif parts["ema"] is not None:  # the averaged weights are the ones that were validated
        model.load_state_dict(parts["ema"].module.state_dict())
    frame = pd.DataFrame(run.history)
    metric = f"val_{config.metric}"
    summary.update(best_score=run.best_score, finished=True, epochs_run=len(frame),
                   best_epoch=int(frame.loc[frame[metric].idxmax(), "epoch"]) if len(frame) else None,
                   stopped_early=len(frame) < config.epochs,
                   train_seconds=round(float(frame["seconds"].sum()) + (cached.seconds if cached else 0.0), 2)
                   if len(frame) else 0.0)
    if out is not None and ctx.is_main:
        write_csv(frame, out / "history.csv")
        write_json(out / "fit.json", {**summary, "config": asdict(config)})
    frame.attrs.update(summary)
    return frame
