"""Where the numbers are computed: device, precision, memory layout, loaders, seeds, CPU tuning.

Everything that moves tensors to hardware lives here, so training, evaluation and prediction
share one definition of "the device", "mixed precision" and "a batch on the device", and
importing `helpers.predict` does not import the training loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import InputError

DEVICE_TYPES = ("cuda", "mps", "cpu")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the best available: cuda, then mps, then cpu."""
    if device is not None and str(device) != "auto":
        if str(device).split(":")[0] not in DEVICE_TYPES:
            raise InputError(f"unknown device {str(device)!r}; choose 'cuda', 'mps', 'cpu' or 'auto'")
        try:
            device = torch.device(device)
        except RuntimeError as err:  # "cuda:x", "cpu:0:1": torch's own parse error names no choices
            raise InputError(f"invalid device {str(device)!r} ({err}); choose 'cuda', 'cuda:N', 'mps', 'cpu' or "
                             f"'auto'") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError("device 'mps' requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type for ``device``: bf16 on GPUs that have it (Ampere and later),
    fp16 on older ones (which then needs a GradScaler), None (plain fp32) on CPU and MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def training_step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                          dtype: torch.dtype | None, optimizer: torch.optim.Optimizer,
                          scaler: torch.amp.GradScaler) -> float:
    """Seconds of one full training step: forward under ``dtype`` autocast, cross-entropy, backward through
    ``scaler`` (a no-op unless fp16), an optimizer step; the GPU is synchronized before and after."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with autocast(device, dtype):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def training_steps_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                              dtype: torch.dtype | None, steps: int, warmup: int = 1) -> float:
    """Images per second of full training steps (`training_step_seconds`, AdamW): the median of ``steps``
    timed steps after ``warmup`` untimed ones (the first steps allocate memory and pick kernels)."""
    import statistics

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    times = [training_step_seconds(model, x, y, device, dtype, optimizer, scaler) for _ in range(warmup + steps)]
    return len(x) / statistics.median(times[warmup:])


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """Move a batch to ``device``; image batches (N, C, H, W) in channels_last layout, which
    convolutions run faster on (GPU tensor cores, and about 1.4x on this x86 CPU)."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators seeded with ``seed`` for the block only: afterwards they are
    back where the caller left them, so a helper that draws its own randomness (augmented views of a cache)
    does not reset the caller's stream. GPU generators are not touched: the images are augmented on the CPU."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # restores torch's CPU generator, whatever happens in the block
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed every GPU as well
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's RANK, WORLD_SIZE ...), ``default`` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got {text!r}") from None


def default_num_workers() -> int:
    """Loader processes: on Linux one per spare core (up to 4), the cores shared among the training
    processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``). On macOS and Windows worker
    processes are spawned and re-import the notebook's code, which is slow and fragile in
    Jupyter, so images are read in the main process there."""
    if platform.system() != "Linux":
        return 0
    local_processes = max(1, env_int("LOCAL_WORLD_SIZE", 1))
    return max(0, min(4, (os.cpu_count() or 1) // local_processes - 1))


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it, so a
    # loader built with the same seed gives every worker the same random stream again.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0,
                num_workers: int | None = None, sampler: torch.utils.data.Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order and worker randomness follow ``seed``: the same seed gives the same
    batches, and the same augmentations for the same number of workers (each worker's random stream
    follows the seed; with none, the process's global one does, which `seed_everything` sets). Another
    worker count draws other augmentations. Pinned memory on CUDA only."""
    workers = default_num_workers() if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=generator, worker_init_fn=_worker_init if workers else None,
                      drop_last=drop_last, persistent_workers=False)


def with_progress(batches: Iterable, desc: str, enabled: bool) -> Iterator:
    """Yield from ``batches`` (a DataLoader), with a progress bar when ``enabled``.

    The loader is iterated exactly once: ``tqdm.auto``'s bar, handed the loader itself, creates a
    second iterator, which draws from the loader's random generator (so the shuffled order would
    depend on whether a bar is shown) and starts worker processes twice.
    """
    if not enabled:
        yield from batches
        return
    with tqdm(total=len(batches), desc=desc, leave=False) as bar:
        for batch in batches:
            yield batch
            bar.update()


def progress_default() -> bool:
    """Whether progress bars are drawn when a caller does not say: yes, unless ``TL_PROGRESS=0``.

    The course runner and the test suite set it: in a notebook executed by papermill or nbval every
    bar update is saved as an output (thousands per training cell), while a person at the notebook
    wants the bars. ``fit`` and the feature cache use this default.
    """
    return os.environ.get("TL_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (Linux: MemAvailable), or None where unknown."""
    if os.path.isfile("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def tune_cpu() -> dict:
    """Make CPU inference and training faster on this process; returns what was changed.

    - glibc (Linux): raise the mmap and trim thresholds so large freed blocks stay in the heap.
      By default every batch's activations are mmap-ed and page-faulted in afresh, which on a
      2-core CPU costs more than the convolutions (EfficientNet-Lite0 at 224 px: 22 -> 53 img/s,
      `python benchmarks/cpu_tuning.py`). The price: the process keeps its peak memory.
    - OpenCV: one thread per reader, so its pool does not fight DataLoader workers for cores.

    Called by the notebooks' setup cell, the course runner and `helpers.predict`; importing
    `helpers` changes nothing. ``TL_DEFAULT_MALLOC=1`` leaves glibc alone.
    """
    import cv2

    cv2.setNumThreads(0)
    changed = {"opencv_threads": 0, "malloc": "default"}
    if platform.system() == "Linux" and os.environ.get("TL_DEFAULT_MALLOC") != "1":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # musl or another libc without mallopt: nothing to tune
            return changed
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30)) and libc.mallopt(m_mmap_threshold,
                                                                                      ctypes.c_int(1 << 30))
        changed["malloc"] = "large blocks kept in the heap" if ok else "mallopt refused"
    return changed
