"""Several processes, one training: what `fit` needs to run unchanged under ``torchrun``.

    torchrun --nproc_per_node=4 -m helpers.train --run-name big ...      # 4 GPUs (or 4 CPU processes)

``torchrun`` starts one process per GPU and tells each, in its environment, its ``RANK`` (0 ..
WORLD_SIZE - 1), its ``LOCAL_RANK`` on its machine and the ``WORLD_SIZE``. `context` reads them
and joins the process group (``nccl`` for GPU tensors, ``gloo`` for CPU ones). Every method of
the `Distributed` it returns does nothing in a single process, so `fit` calls them
unconditionally and one process trains exactly as before.

With W processes, each training step of batch size B per process:
- every process reads its own B images: item r, r + W, r + 2W, ... of the order one process
  would use (`GlobalOrderSampler`), so W processes see the batches of one process with batch W*B;
- ``DistributedDataParallel`` averages the gradients over the processes after ``backward``, so
  the weights stay identical everywhere (with class weights, each process's loss is rescaled first,
  `Distributed.global_mean`, so that the average is the weighted mean over the global batch);
- the losses and accuracies are summed over the processes (`Distributed.pool`), validation runs
  on a share of the validation set per process and the predictions are gathered
  (`Distributed.gather`): every process computes the same history and makes the same early-stopping
  decision, and rank 0 alone writes files.

Validation is split rather than run on rank 0 alone: it then takes 1/W of the time instead of
idling W - 1 GPUs (and, on a large set, running into the collective timeout of the waiting ones),
its cached features are split like the training ones, and the scores are exact: the shares do not
overlap and are not padded. With a frozen prefix, each process caches the features of a fixed
share of the training images (`Distributed.shard`) and shuffles within it every epoch; only
without the cache do W processes reproduce one process's batches exactly, and only when no process's share
leaves a last batch of one image, which `fit` drops (a training-mode BatchNorm cannot use it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from .errors import InputError
from .runtime import env_int, make_loader

# Added to a seed per rank, so processes draw different augmentations and dropout masks; rank 0
# keeps the seed itself, so its randomness is that of a single process.
RANK_SEED_STRIDE = 1_000_003


# DDP's switch for "no buffer broadcast before every forward" (renamed in torch 2.14).
NO_BUFFER_SYNC_BEFORE_FORWARD = ({"forward_sync_buffers": False}
                                 if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                                 else {"broadcast_buffers": False})


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ones torchrun started; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine (they share its memory and cores)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress bars."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:<local rank>``."""
        if not self.enabled:
            return device
        if device.type == "mps":
            raise InputError("training in several processes needs CUDA GPUs or the CPU; Apple MPS has no "
                             "process-group backend: run one process (python, not torchrun)")
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def seed(self, seed: int) -> int:
        """A seed of this process's own: ``seed`` on rank 0, shifted on the others."""
        return seed + self.rank * RANK_SEED_STRIDE

    def shard(self, dataset: Dataset, pad: bool) -> Dataset:
        """This process's fixed share of ``dataset``: items rank, rank + W, ...; with ``pad``, the
        first items repeat so that every share has the same length (DistributedSampler's rule)."""
        if not self.enabled:
            return dataset
        if pad:  # equal shares: every process must take the same number of steps, or DDP waits forever
            indices = list(DistributedSampler(dataset, self.world_size, self.rank, shuffle=False))
        else:
            indices = list(range(self.rank, len(dataset), self.world_size))
        return Subset(dataset, indices)

    def sampler(self, dataset: Dataset, seed: int, epoch: int) -> GlobalOrderSampler | None:
        """This process's items of epoch ``epoch`` (the order depends only on seed and epoch, so a
        resumed run reads the same batches); None in a single process (the loader shuffles)."""
        if not self.enabled:
            return None
        sampler = GlobalOrderSampler(dataset, self.world_size, self.rank, seed)
        sampler.set_epoch(epoch)
        return sampler

    def sync_batchnorm(self, net: nn.Module, device: torch.device) -> None:
        """Replace the BatchNorm layers of ``net`` (in place) by ones that compute batch statistics
        over all processes: worth it when a trained BatchNorm sees small per-process batches."""
        if not self.enabled:
            return
        if device.type != "cuda":
            raise InputError(f"sync_batchnorm=True needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only), "
                             f"but this run trains on {device}; set sync_batchnorm=False")
        from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNorm + activation layers

        convert_sync_batchnorm(net)

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """``net`` in DistributedDataParallel, which takes the parameters that train now.

        No buffer broadcast before every forward: in training mode BatchNorm normalizes with the
        batch's statistics, not the running ones, so that only matters for evaluation, and
        `sync_buffers` copies rank 0's running statistics once per epoch instead.
        """
        if not self.enabled:
            return net
        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                       **NO_BUFFER_SYNC_BEFORE_FORWARD)

    @staticmethod
    def unwrap(net: nn.Module) -> nn.Module:
        """The module inside DistributedDataParallel (evaluated without it: no collective calls)."""
        return net.module if isinstance(net, DistributedDataParallel) else net

    def pool(self, stats: dict) -> dict:
        """`helpers.training.train_one_epoch`'s result over all processes: the loss averaged over
        every process's images (weighted by their class weights, as one process would), the
        accuracy over all images."""
        if not self.enabled:
            return stats
        totals = torch.tensor([stats["loss"] * stats["loss_weight"], stats["loss_weight"],
                               stats["accuracy"] * stats["images"], stats["images"]], dtype=torch.float64)
        dist.all_reduce(totals)
        loss, weight, right, images = totals.tolist()
        return {"loss": loss / weight, "accuracy": right / images, "loss_weight": weight, "images": int(images)}

    def gather(self, result: dict) -> dict:
        """`helpers.training.evaluate`'s result over every process's share of the validation set."""
        if not self.enabled:
            return result
        shares: list = [None] * self.world_size
        dist.all_gather_object(shares, (result["loss"] * result["loss_weight"], result["loss_weight"],
                                        result["targets"], result["predictions"]))
        weight = sum(share[1] for share in shares)
        return {"loss": sum(share[0] for share in shares) / weight, "loss_weight": weight,
                "targets": np.concatenate([share[2] for share in shares]),
                "predictions": np.concatenate([share[3] for share in shares])}

    def global_mean(self, criterion: nn.Module) -> nn.Module:
        """``criterion`` for the training step, so that W processes with batch B take the step one
        process takes with batch W*B.

        DDP averages the processes' gradients, and each is the gradient of its own batch's mean loss.
        That is the mean over the global batch only when every process's batch weighs the same: with
        class weights, ``CrossEntropyLoss`` divides by the sum of the batch's weights, which differs
        from process to process."""
        # Without class weights every process's batch weighs its size, the same for all (the shares are padded).
        weighted = getattr(criterion, "weight", None) is not None
        return _GlobalMean(criterion, self.world_size) if self.enabled and weighted else criterion

    def sync_buffers(self, *modules: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
        if not self.enabled:
            return
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait until every process got here (e.g. until rank 0 has written a checkpoint)."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of a command-line run)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _GlobalMean(nn.Module):
    """A loss whose value is this process's batch mean (what the history logs) but whose gradient,
    once DDP has averaged it over the W processes, is that of the mean over all their batches:
    the gradient is scaled by W * (this batch's weight) / (all batches' weight)."""

    def __init__(self, criterion: nn.Module, world_size: int):
        super().__init__()
        self.criterion, self.world_size = criterion, world_size

    @property
    def weight(self) -> torch.Tensor | None:  # the class weights, read by `helpers.training._loss_weight`
        return getattr(self.criterion, "weight", None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, targets)
        weight = self.weight
        mine = (weight[targets].sum() if weight is not None
                else torch.tensor(float(len(targets)), device=logits.device)).detach().double()
        total = mine.clone()
        dist.all_reduce(total)
        scale = (mine * self.world_size / total).to(loss.dtype)  # exactly 1 without class weights
        return loss * scale - (loss * (scale - 1)).detach()  # the value stays ``loss``


def context() -> Distributed:
    """This process's `Distributed`; under torchrun (``WORLD_SIZE`` > 1) the first call joins the
    process group from the environment: ``nccl`` for CUDA tensors, ``gloo`` for CPU tensors."""
    local_world = env_int("LOCAL_WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0), local_world)
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Distributed()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE is {world} but this PyTorch build has no torch.distributed")
    local_rank = env_int("LOCAL_RANK", 0)
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             f"start at most that many processes per machine (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)  # before the process group, so NCCL uses this process's GPU
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (metrics) over gloo, GPU tensors over NCCL
    dist.init_process_group(backend)  # MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE from torchrun
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, local_world)


def single_process_order(n: int, seed: int) -> list[int]:
    """The order in which one process's `train_one_epoch` reads ``n`` items from
    ``make_loader(dataset, ..., shuffle=True, seed=seed, num_workers=0)``.

    Read off such a loader, iterated once, as `train_one_epoch` does (`helpers.runtime.with_progress`;
    a progress bar does not change the order).
    """
    loader = make_loader(range(n), batch_size=max(n, 1), shuffle=True, device=torch.device("cpu"), seed=seed,
                         num_workers=0)
    return next(iter(loader)).tolist()


class GlobalOrderSampler(DistributedSampler):
    """A DistributedSampler whose global order is the one a single process shuffles.

    DistributedSampler shuffles with a generator of its own, so its order differs from a single
    process's DataLoader. This one takes the single-process order of epoch ``epoch``
    (``make_loader``'s ``seed + epoch``, see `single_process_order`), pads it as DistributedSampler
    does, and gives rank r the items r, r + W, r + 2W, ...: with B items per process, step k of W
    processes reads exactly the items of step k of one process with batch W*B.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def __iter__(self):
        order = single_process_order(len(self.dataset), self.seed + self.epoch)
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas])
