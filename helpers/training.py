"""The training loop: honest on a 2-core laptop, fast on a GPU, resumable anywhere.

`fit` picks the device (cuda -> mps -> cpu), uses mixed precision on CUDA and channels_last everywhere,
shows tqdm progress bars, schedules the learning rate with warm-up, stops early, writes the
best and the last checkpoint atomically after every epoch, and resumes from the last one.

Determinism: every epoch reseeds all random number generators from (seed, epoch), so an
epoch's shuffling, augmentation and dropout do not depend on what ran before it. That is what
lets a run killed at any point resume to exactly the same result on the CPU.

The frozen-prefix cache: when the first k layer groups are frozen (strategies head, last_n,
truncate), their output for a given image never changes, so we compute it once and train the
remaining groups on the stored tensors. With a deterministic pipeline this is the same
function, just without the repeated work; with random augmentation, caching means training
on a fixed number of augmented views (``cache_views``) instead of a fresh one each epoch.
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .checkpoint import atomic_save, describe_model, load_checkpoint
from .files import write_json
from .freezing import frozen_prefix_length, param_groups, unfreeze_last
from .models import TransferModel

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or infinity; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------------------
# Devices, seeds, loaders


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the best available: cuda, then mps, then cpu."""
    if device is not None and str(device) != "auto":
        if str(device).split(":")[0] not in ("cuda", "mps", "cpu"):
            raise ValueError(f"unknown device {str(device)!r}; choose 'cuda', 'mps', 'cpu' or 'auto'")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA GPUs that support it, fp16 on older ones, None (fp32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_num_workers() -> int:
    """Loader processes: on Linux one per spare core (up to 4). On macOS and Windows worker
    processes are spawned and re-import the notebook's code, which is slow and fragile in
    Jupyter, so images are read in the main process there."""
    if platform.system() != "Linux":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _worker_init(worker_id: int) -> None:
    # Torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, device: torch.device,
                seed: int = 0, num_workers: int | None = None) -> DataLoader:
    """A DataLoader that behaves the same on Linux, macOS and Windows; pinned memory on CUDA only."""
    workers = default_num_workers() if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=generator,
                      worker_init_fn=_worker_init if workers else None, drop_last=False,
                      persistent_workers=False)


# ----------------------------------------------------------------------------------------
# Metrics


def score(metric: str, targets: np.ndarray, predictions: np.ndarray) -> float:
    if metric == "accuracy":
        return float(accuracy_score(targets, predictions))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(targets, predictions))
    if metric == "macro_f1":
        return float(f1_score(targets, predictions, average="macro", zero_division=0))
    raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")


# ----------------------------------------------------------------------------------------
# Frozen-prefix cache


@torch.inference_mode()
def extract_features(model: TransferModel, dataset: Dataset, stop: int, device: torch.device,
                     batch_size: int = 64, num_workers: int | None = None, desc: str = "features",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first ``stop`` groups over ``dataset`` once; return (outputs, targets) on the CPU."""
    model.eval().to(device)
    loader = make_loader(dataset, batch_size, shuffle=False, device=device, num_workers=num_workers)
    outputs, targets = [], []
    dtype = amp_dtype(device)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = x.to(device, non_blocking=True)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.forward_groups(x, 0, stop)
        outputs.append(out.float().contiguous().cpu())
        targets.append(y)
    return torch.cat(outputs), torch.cat(targets)


def _dataset_transform(dataset: Dataset) -> Callable | None:
    while hasattr(dataset, "dataset") and not hasattr(dataset, "transform"):  # Subset
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


# ----------------------------------------------------------------------------------------
# Schedules


def _lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _make_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
            pct_start=max(warmup_steps / total_steps, 0.05))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(schedule, total_steps, warmup_steps))


# ----------------------------------------------------------------------------------------
# fit


def _validate(epochs, lr, batch_size, optimizer, schedule, metric, label_smoothing, patience, cache,
              cache_views, layer_decay, warmup_epochs):
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < 10):
        raise ValueError(f"lr must be a positive number below 10, got {lr!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value, valid in (("optimizer", optimizer, OPTIMIZERS), ("schedule", schedule, SCHEDULES),
                               ("metric", metric, METRICS), ("cache", cache, ("auto", True, False))):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; choose one of {list(valid)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or a positive integer, got {patience!r}")
    if not isinstance(cache_views, int) or cache_views < 1:
        raise ValueError(f"cache_views must be a positive integer, got {cache_views!r}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")


def _validate_more(model: TransferModel, epochs: int, weight_decay: float, max_grad_norm: float | None,
                   unfreeze_schedule: dict, meta: dict | None, class_weights) -> None:
    """Checks that would otherwise fail late: after caching, mid-run, or when a checkpoint is loaded."""
    if isinstance(class_weights, str) and class_weights != "balanced":
        raise ValueError(f"class_weights must be 'balanced', a tensor or None, got {class_weights!r}")
    if class_weights is not None and not isinstance(class_weights, str):
        shape = tuple(torch.as_tensor(class_weights).shape)
        if shape != (model.num_classes,):
            raise ValueError(f"class_weights needs {model.num_classes} values (one per class), got shape {shape}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm!r}")
    groups = len(model.group_names)
    for epoch, n in unfreeze_schedule.items():
        if not 1 <= int(epoch) <= epochs or not 1 <= int(n) <= groups:
            raise ValueError(f"unfreeze_schedule entry {epoch}: {n} is invalid; keys are epochs 1..{epochs}, "
                             f"values numbers of groups 1..{groups} (of {model.group_names})")
    _check_plain(meta, "meta")


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


def fit(model: TransferModel, train_set: Dataset, val_set: Dataset, *, epochs: int = 5, lr: float = 1e-3,
        batch_size: int = 32, optimizer: str = "adamw", weight_decay: float = 0.01, schedule: str = "cosine",
        warmup_epochs: float = 1.0, label_smoothing: float = 0.0,
        class_weights: str | torch.Tensor | None = None, metric: str = "accuracy",
        patience: int | None = None, out_dir: str | os.PathLike | None = None, resume: bool = False,
        seed: int = 0, device: str | torch.device | None = None, amp: bool = True,
        channels_last: bool = True, cache: str | bool = "auto", cache_views: int = 1,
        layer_decay: float = 1.0, unfreeze_schedule: dict[int, int] | None = None,
        max_grad_norm: float | None = None, ema_decay: float | None = None, num_workers: int | None = None,
        restore_best: bool = True, meta: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Train ``model`` (already frozen by `apply_strategy`) and return the history.

    History columns: epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy,
    val_<metric>, seconds. With ``out_dir``, writes ``best.pt``, ``last.pt``,
    ``history.csv`` and ``fit.json`` there after every epoch; ``resume=True`` continues
    from ``last.pt``. ``unfreeze_schedule={epoch: n}`` makes the last n groups trainable
    from that (1-based) epoch on (gradual unfreezing). ``layer_decay < 1`` gives earlier
    groups smaller learning rates. ``class_weights="balanced"`` reweights the loss by
    inverse class frequency. ``meta`` is stored in the checkpoints (e.g. ``crop_pct``, task).

    ``ema_decay`` (e.g. 0.998) keeps an exponential moving average of the weights (timm's
    ``ModelEmaV3``, decay warmed up so early steps do not drag the pretrained start along).
    The average is what gets validated, selected and saved as ``best.pt``; the raw model's
    validation scores stay in the history as ``raw_val_*`` so the two can be compared.
    """
    if not isinstance(model, TransferModel):
        raise TypeError(f"fit needs a TransferModel from helpers.models.create_model, got {type(model).__name__}")
    _validate(epochs, lr, batch_size, optimizer, schedule, metric, label_smoothing, patience, cache,
              cache_views, layer_decay, warmup_epochs)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"empty dataset: {len(train_set)} training and {len(val_set)} validation images")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where last.pt is)")
    _validate_more(model, epochs, weight_decay, max_grad_norm, unfreeze_schedule or {}, meta, class_weights)
    if ema_decay is not None and not (isinstance(ema_decay, float) and 0.0 < ema_decay < 1.0):
        raise ValueError(f"ema_decay must be None or a float in (0, 1), e.g. 0.998; got {ema_decay!r}")
    _check_classes(model, train_set, val_set)
    unfreeze_schedule = {int(k): int(v) for k, v in (unfreeze_schedule or {}).items()}
    meta = dict(meta or {})
    device = pick_device(device)
    dtype = amp_dtype(device) if amp else None
    out = Path(out_dir) if out_dir is not None else None

    # The schedule's groups must be trainable from their epoch on; only what stays frozen
    # for the whole run may be cached.
    prefix = frozen_prefix_length(model)
    if unfreeze_schedule:
        prefix = min(prefix, len(model.group_names) - max(unfreeze_schedule.values()))
    train_random = not _dataset_to_check_deterministic(train_set)
    use_cache = prefix > 0 and (cache is True or (cache == "auto" and not train_random))
    if use_cache and train_random:
        warnings.warn(f"caching {cache_views} augmented view(s) per training image: epochs cycle through "
                      f"them instead of drawing fresh augmentations (faster, but less augmentation)",
                      stacklevel=2)
    views = cache_views if (use_cache and train_random) else 1

    classes = list(getattr(train_set, "classes", [])) or [str(i) for i in range(model.num_classes)]
    sample = train_set[0][0]
    identity = describe_model(model, classes, sample.shape[-1], meta.get("crop_pct"))
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "schedule": schedule,
              "seed": seed, "metric": metric, "cache": bool(use_cache), "cache_views": views,
              "layer_decay": layer_decay, "unfreeze_schedule": {str(k): v for k, v in unfreeze_schedule.items()},
              "ema_decay": ema_decay}

    model.to(device)
    if channels_last:  # faster convolutions on CUDA and, measured here, on x86 CPUs too (about 1.4x)
        model.to(memory_format=torch.channels_last)

    # Features of the frozen prefix, computed once (per augmented view).
    cache_seconds = 0.0
    if use_cache:
        started = time.perf_counter()
        train_views = []
        try:
            for v in range(views):
                seed_everything(seed * 1000 + 777 + v)
                train_views.append(extract_features(model, train_set, prefix, device, 2 * batch_size,
                                                    num_workers, f"caching train view {v + 1}/{views}", progress))
            val_inputs = extract_features(model, val_set, prefix, device, 2 * batch_size, num_workers,
                                          "caching val", progress)
        except torch.cuda.OutOfMemoryError as err:
            raise _out_of_memory(batch_size, sample.shape[-1]) from err
        cache_seconds = time.perf_counter() - started
    start_group = prefix if use_cache else 0

    def train_loader(epoch: int) -> DataLoader:
        if use_cache:
            x, y = train_views[(epoch - 1) % views]
            return make_loader(TensorDataset(x, y), batch_size, True, device, seed=seed * 1000 + epoch,
                               num_workers=0)
        return make_loader(train_set, batch_size, True, device, seed=seed * 1000 + epoch, num_workers=num_workers)

    val_loader = (make_loader(TensorDataset(*val_inputs), batch_size * 2, False, device, num_workers=0)
                  if use_cache else make_loader(val_set, batch_size * 2, False, device, num_workers=num_workers))

    # Loss, optimizer, schedule.
    weights = None  # class_weights was validated by _validate_more before any work
    if isinstance(class_weights, str):  # "balanced"
        targets = np.asarray(getattr(train_set, "targets"))
        present = np.unique(targets)
        w = np.ones(model.num_classes, dtype=np.float32)
        w[present] = compute_class_weight("balanced", classes=present, y=targets)
        weights = torch.tensor(w)
    elif class_weights is not None:
        weights = torch.as_tensor(class_weights, dtype=torch.float32)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=label_smoothing)
    groups = param_groups(model, lr, layer_decay, weight_decay)
    opt = (torch.optim.AdamW(groups, lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True))
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = _make_scheduler(opt, schedule, total_steps, int(round(warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Warm-up power 3/4 suits short runs: decay 0.97 after 100 steps, 0.99 after 450, capped at ema_decay.
    ema = (ModelEmaV3(model, decay=ema_decay, use_warmup=True, warmup_power=3 / 4)
           if ema_decay is not None else None)

    history: list[dict] = []
    best_score, bad_epochs, start_epoch = -math.inf, 0, 1
    if resume and out is not None and (out / "last.pt").is_file():
        state = load_checkpoint(out / "last.pt")
        for field in ("backbone", "classes", "strategy", "image_size"):
            if state[field] != identity[field]:
                raise ValueError(f"cannot resume from {out / 'last.pt'}: {field} is {state[field]!r} there "
                                 f"but {identity[field]!r} now")
        changed = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume from {out / 'last.pt'}: training settings differ: "
                             + ", ".join(f"{k} is {a!r} there but {b!r} now" for k, (a, b) in changed.items())
                             + " (use the same settings, or a new out_dir to start over)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        history, best_score, bad_epochs = list(state["history"]), state["best_score"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        for epoch_done in range(1, start_epoch):  # re-apply unfreezing that already happened
            if epoch_done in unfreeze_schedule:
                unfreeze_last(model, unfreeze_schedule[epoch_done])

    summary = {"device": str(device), "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
               "channels_last": bool(channels_last), "cached": bool(use_cache),
               "cached_groups": model.group_names[:start_group], "cache_views": views,
               "cache_seconds": round(cache_seconds, 2), "train_images": len(train_set),
               "val_images": len(val_set)}
    stopped_early = False
    best_state = None
    epochs_bar = tqdm(range(start_epoch, epochs + 1), desc="epochs", disable=not progress,
                      initial=start_epoch - 1, total=epochs)
    try:
        for epoch in epochs_bar:
            if patience is not None and bad_epochs >= patience:
                stopped_early = True
                break
            if epoch in unfreeze_schedule:
                unfreeze_last(model, unfreeze_schedule[epoch])
            started = time.perf_counter()
            seed_everything(seed * 1000 + epoch)
            model.train()
            lr_now = opt.param_groups[-1]["lr"] / opt.param_groups[-1].get("lr_scale", 1.0)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(train_loader(epoch), desc=f"epoch {epoch}", leave=False, disable=not progress)
            for step, (x, y) in enumerate(bar, start=(epoch - 1) * steps_per_epoch + 1):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model.forward_groups(x, start_group)
                loss = criterion(logits.float(), y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} in epoch {epoch}; lower the learning rate (now {lr}) "
                        f"or check the inputs. The last good checkpoint is unchanged"
                        + (f" in {out}" if out else ""))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if max_grad_norm:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                scaler.step(opt)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(model, step)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")

            kept = ema.module if ema is not None else model  # the weights we validate, select and save
            val_loss, val_targets, val_preds = evaluate_loss(kept, val_loader, criterion, device, start_group,
                                                             dtype, channels_last)
            if not math.isfinite(val_loss):  # e.g. weights blown up by the last step: do not save them
                raise NonFiniteLossError(
                    f"validation loss became {val_loss} in epoch {epoch}; lower the learning rate (now {lr}) "
                    f"or set max_grad_norm. The last good checkpoint is unchanged" + (f" in {out}" if out else ""))
            row = {"epoch": epoch, "lr": lr_now, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                   "val_loss": val_loss, "val_accuracy": score("accuracy", val_targets, val_preds)}
            if metric != "accuracy":
                row[f"val_{metric}"] = score(metric, val_targets, val_preds)
            if ema is not None:  # the raw weights too, side by side with their average
                raw_loss, raw_targets, raw_preds = evaluate_loss(model, val_loader, criterion, device,
                                                                 start_group, dtype, channels_last)
                row["raw_val_loss"] = raw_loss
                row["raw_val_accuracy"] = score("accuracy", raw_targets, raw_preds)
                if metric != "accuracy":
                    row[f"raw_val_{metric}"] = score(metric, raw_targets, raw_preds)
            row["seconds"] = time.perf_counter() - started
            history.append({k: float(v) if k != "epoch" else int(v) for k, v in row.items()})
            current = row[f"val_{metric}"]
            improved = current > best_score
            if improved:
                best_score, bad_epochs = current, 0
                if out is None and restore_best:
                    best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
            else:
                bad_epochs += 1
            epochs_bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", **{f"val_{metric}": f"{current:.3f}"})
            if out is not None:
                payload = {**identity, "meta": meta, "epoch": epoch, "score": current, "metric": metric,
                           "model": kept.state_dict()}
                if improved:
                    atomic_save(payload, out / "best.pt")
                # last.pt resumes training: the raw weights, and the average under "ema".
                atomic_save({**payload, "model": model.state_dict(),
                             **({"ema": ema.module.state_dict()} if ema is not None else {}),
                             "config": config, "optimizer": opt.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "history": history, "best_score": best_score, "bad_epochs": bad_epochs},
                            out / "last.pt")
                _write_history(out, history, {**summary, "best_score": best_score, "config": config,
                                              "stopped_early": stopped_early})
    except torch.cuda.OutOfMemoryError as err:
        raise _out_of_memory(batch_size, sample.shape[-1]) from err

    if patience is not None and bad_epochs >= patience and len(history) < epochs:
        stopped_early = True
    if restore_best and out is not None and (out / "best.pt").is_file():
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    elif restore_best and best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:  # hand back the averaged weights, the ones that were validated
        model.load_state_dict(ema.module.state_dict())
    frame = pd.DataFrame(history)
    summary.update(best_score=best_score, stopped_early=stopped_early,
                   train_seconds=round(float(frame["seconds"].sum()) + cache_seconds, 2) if len(frame) else 0.0)
    if out is not None:
        _write_history(out, history, {**summary, "config": config})
    frame.attrs.update(summary)
    return frame


def _out_of_memory(batch_size: int, image_size: int) -> RuntimeError:
    return RuntimeError(f"the GPU ran out of memory at batch_size={batch_size} and image size {image_size}: "
                        f"try a smaller batch_size (e.g. {max(1, batch_size // 2)}) or image_size, or a "
                        f"strategy that trains fewer layers")


def _check_classes(model: TransferModel, train_set: Dataset, val_set: Dataset) -> None:
    """Both sets must encode labels the same way, and the model needs one output per class."""
    train_classes, val_classes = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train_classes is not None and val_classes is not None and list(train_classes) != list(val_classes):
        raise ValueError(f"the training set's classes {list(train_classes)} differ from the validation set's "
                         f"{list(val_classes)}: build the validation set with classes=train_set.classes")
    if train_classes is not None and len(train_classes) != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} outputs but the training set has "
                         f"{len(train_classes)} classes {list(train_classes)}: create the model with "
                         f"num_classes={len(train_classes)}")


def _dataset_to_check_deterministic(dataset: Dataset) -> bool:
    from .data import is_deterministic

    return is_deterministic(_dataset_transform(dataset))


@torch.inference_mode()
def evaluate_loss(model: TransferModel, loader: DataLoader, criterion: nn.Module, device: torch.device,
                  start_group: int = 0, dtype: torch.dtype | None = None,
                  channels_last: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, targets and predictions of ``model`` over ``loader`` (eval mode)."""
    model.eval()
    loss_sum, targets, preds = 0.0, [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model.forward_groups(x, start_group)
        loss_sum += criterion(logits.float(), y).item() * len(y)
        targets.append(y.cpu())
        preds.append(logits.argmax(1).cpu())
    targets, preds = torch.cat(targets).numpy(), torch.cat(preds).numpy()
    return loss_sum / len(targets), targets, preds


def _write_history(out: Path, history: list[dict], summary: dict) -> None:
    from .data import atomic_write_csv

    atomic_write_csv(pd.DataFrame(history), out / "history.csv")
    write_json(out / "fit.json", summary)
