"""The frozen-prefix cache: compute the frozen layers once, train the rest on stored tensors.

When the first k layer groups are frozen (strategies head, last_n, truncate), their output for
a given input never changes, so running them every epoch repeats the same work. We run them
once over the training and validation images, keep the outputs in memory, and train the
remaining groups on those tensors: the same function, hundreds of times faster per epoch.

With random augmentation the outputs are no longer fixed: caching then means training on a
fixed number of augmented *views* per image (``views``), which is faster but augments less.
Each view is drawn with its own seed, which also reaches the DataLoader's worker processes.
A dataset whose transform cannot be inspected counts as random.

Under torchrun, `fit` passes each process its own fixed share of the images (``Subset``s from
`helpers.distributed.Distributed.shard`): every process computes and keeps only its share, so the
feature pass is W times faster and takes 1/W of the memory per process.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from . import runtime
from .freezing import frozen_prefix_length
from .models import TransferModel
from .transforms import UNKNOWN, is_deterministic, transform_of


class CachedViewsWarning(UserWarning):
    """Augmented training data is cached as a few fixed views: epochs cycle through them instead of drawing
    fresh augmentations (a trade of augmentation for speed that ``cache=True`` asks for)."""

# Share of the currently available memory the cache may take: training needs the rest.
MEMORY_SHARE = 0.5


@dataclass
class FeatureCache:
    """Outputs of the first ``prefix`` groups: one (inputs, targets) pair per training view, and
    the validation set's."""

    prefix: int
    train_views: list[tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor]
    seconds: float

    def train_view(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The view an epoch (1-based) trains on: epochs cycle through the views."""
        return self.train_views[(epoch - 1) % len(self.train_views)]


def is_random(dataset: Dataset) -> bool:
    """True unless the dataset's transform is known to give the same output every call."""
    transform = transform_of(dataset)
    return transform is UNKNOWN or not is_deterministic(transform)


def plan(model: TransferModel, train_set: Dataset, cache: str | bool, views: int,
         unfreeze_schedule: dict[int, int]) -> tuple[int, int]:
    """(groups to cache, training views) for a run; (0, 0) when nothing is cached.

    Only groups that stay frozen for the whole run can be cached, so gradual unfreezing
    shortens the prefix. ``cache="auto"`` caches only deterministic data; ``True`` also caches
    augmented data (``views`` augmented copies, with a warning); ``False`` never caches.
    """
    prefix = frozen_prefix_length(model)
    if unfreeze_schedule:
        prefix = min(prefix, len(model.group_names) - max(unfreeze_schedule.values()))
    random = is_random(train_set)
    if prefix <= 0 or cache is False or (cache == "auto" and random):
        return 0, 0
    if random:
        warnings.warn(f"caching {views} augmented view(s) per training image: epochs cycle through them "
                      f"instead of drawing fresh augmentations (faster, but less augmentation)", CachedViewsWarning,
                      stacklevel=3)
        return prefix, views
    return prefix, 1


@torch.inference_mode()
def extract_features(model: TransferModel, dataset: Dataset, stop: int, device: torch.device,
                     batch_size: int = 64, num_workers: int | None = None, desc: str = "features",
                     progress: bool | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                     channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first ``stop`` groups over ``dataset`` once, in order; return (outputs, targets) on
    the CPU. ``seed`` fixes the augmentation drawn, in this process and in the loader's workers; the
    caller's global random generators are left as they were (`runtime.seeded`)."""
    model.eval().to(device)
    loader = runtime.make_loader(dataset, batch_size, shuffle=False, device=device, seed=seed,
                                 num_workers=num_workers)
    outputs, targets = [], []
    progress = runtime.progress_default() if progress is None else progress  # None: on, unless TL_PROGRESS=0
    with runtime.seeded(seed):  # without workers the augmentation draws from this process's generators
        for x, y in runtime.with_progress(loader, desc, progress):
            with runtime.autocast(device, dtype):
                out = model.forward_groups(runtime.to_device(x, device, channels_last), 0, stop)
            outputs.append(out.float().contiguous().cpu())
            targets.append(y)
    return torch.cat(outputs), torch.cat(targets)


@torch.inference_mode()
def bytes_per_image(model: TransferModel, sample: torch.Tensor, prefix: int) -> int:
    """Memory one cached image takes (float32 output of the first ``prefix`` groups)."""
    with runtime.eval_mode(model):
        out = model.forward_groups(sample.unsqueeze(0).to(next(model.parameters()).device), 0, prefix)
    return out[0].numel() * 4


def check_memory(needed: int, views: int, images: int, image_size: int, processes: int = 1) -> None:
    """Refuse, with advice, a cache that would take more than ``MEMORY_SHARE`` of free memory;
    ``processes`` on this machine each build one of this size at the same time."""
    free = runtime.available_memory_bytes()
    if free is None or needed * processes <= MEMORY_SHARE * free:
        return
    each = f", in each of {processes} processes" if processes > 1 else ""
    raise MemoryError(
        f"the feature cache would need {needed / 2**30:.1f} GiB{each} ({views} view(s) of {images} images at "
        f"{image_size} px) but only {free / 2**30:.1f} GiB of memory are free: use a smaller image_size, "
        f"fewer cache_views, a strategy that freezes more groups, or cache=False")


def build(model: TransferModel, train_set: Dataset, val_set: Dataset, prefix: int, views: int, *, seed: int,
          batch_size: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
          num_workers: int | None, progress: bool, processes: int = 1) -> FeatureCache:
    """Compute the cache: ``views`` passes over ``train_set`` (view v seeded from ``seed`` and v, under ``dtype``
    autocast), one over ``val_set`` (in fp32). Checks the memory it needs first (for ``processes`` such caches)."""
    sample = train_set[0][0]
    needed = bytes_per_image(model, sample, prefix) * (views * len(train_set) + len(val_set))
    check_memory(needed, views, len(train_set), sample.shape[-1], processes)
    started = time.perf_counter()
    train_views = [extract_features(model, train_set, prefix, device, 2 * batch_size, num_workers,
                                    f"caching train view {v + 1}/{views}", progress, seed * 1000 + 777 + v,
                                    dtype, channels_last) for v in range(views)]
    # Validation is scored in fp32 (`training._validate`), so its cached prefix outputs are computed in fp32 too.
    val = extract_features(model, val_set, prefix, device, 2 * batch_size, num_workers, "caching val", progress,
                           seed, None, channels_last)
    return FeatureCache(prefix, train_views, val, time.perf_counter() - started)
