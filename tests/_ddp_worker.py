"""Started by tests/test_distributed.py under torchrun (2 CPU processes, gloo); not a test file.

    python -m torch.distributed.run --nproc_per_node=2 --max-restarts=1 ... tests/_ddp_worker.py TINY_ROOT BASE

One launch, to pay for process start-up as few times as possible. torchrun's first attempt:
`fit` into BASE/ddp; the command line (`helpers.train.main`) into BASE/cli; the same `fit` into
BASE/killed, where rank 1 kills itself with SIGKILL in the middle of epoch 2. torchrun then starts
both processes again (its second attempt): they skip the finished runs and resume BASE/killed from
``last.pt``.

Every process prints a ``STARTED {json}`` line, and a ``WRITE {json}`` line for each file or folder
under BASE it creates, replaces or removes (an audit hook sees them).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# The model, data and settings that make one process with batch 2B compute what two with batch B
# do: no dropout, every BatchNorm frozen (running statistics, not the batch's), no augmentation.
# SGD: its steps are linear in the gradients, so float noise stays float noise (Adam divides it by the
# square root of tiny second moments and can blow it up to the size of a step). Class weights: the
# processes' batches then weigh differently, and must still add up to the one batch of one process.
SETTINGS = dict(epochs=2, lr=0.01, optimizer="sgd", batch_size=4, seed=3, cache=False, num_workers=0,
                progress=False, class_weights=(1.0, 3.0))
KILL_EPOCH, KILL_STEP = 2, 2
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def model():
    import torch

    from helpers.freezing import apply_strategy
    from helpers.models import create_model
    from helpers.runtime import seed_everything

    seed_everything(0)
    net = apply_strategy(create_model("efficientnet_lite0", 2, dropout=0.0), "last_n", n=2)
    for module in net.modules():  # frozen parameters keep BatchNorm in eval mode (TransferModel.train)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    return net


def datasets(root: Path):
    from helpers.data import ELPV_TASKS, ImageDataset, load_table, make_splits
    from helpers.models import BACKBONES
    from helpers.transforms import eval_transform

    splits = make_splits(load_table(root, root / "labels.csv", "file", "label", "type"), seed=0)
    transform = eval_transform(BACKBONES["efficientnet_lite0"], image_size=64, crop_pct=1.0)
    return tuple(ImageDataset(root, splits[name], group_col="group", classes=ELPV_TASKS["binary"][1],
                              transform=transform) for name in ("train", "val"))


def emit(line: str) -> None:
    """Write one whole line to stdout in a single system call. Both processes share torchrun's pipe:
    ``print`` writes the text and the newline separately, so two ranks' lines could interleave
    ("{...}STARTED {...}"); one write of under PIPE_BUF bytes cannot be split by another."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def record_writes(base: Path, rank: int, attempt: int) -> None:
    """Print a line for every write under ``base`` by this process, as it happens (a process killed
    with SIGKILL runs no exit handler)."""
    base_text = str(base.resolve())

    def hook(event: str, args: tuple) -> None:
        if event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir"):
            return
        path = args[1] if event == "os.rename" else args[0]  # a rename writes its destination
        if not isinstance(path, (str, os.PathLike)) or not os.path.abspath(path).startswith(base_text):
            return
        if event == "open" and not (args[2] or 0) & _WRITING:
            return
        if event == "os.mkdir" and os.path.isdir(path):  # mkdir(exist_ok=True) of an existing folder
            return
        relative = os.path.relpath(os.path.abspath(path), base_text)
        emit("WRITE " + json.dumps({"rank": rank, "attempt": attempt, "event": event, "path": relative}))

    sys.addaudithook(hook)


def kill_in_epoch(epoch: int, step: int) -> None:
    """Make rank 1's `train_one_epoch` SIGKILL its own process at ``step`` of ``epoch``."""
    import helpers.training as training

    original = training.train_one_epoch

    def dying(loader):
        for index, batch in enumerate(loader):
            if index == step:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    def train_one_epoch(net, loader, *args, desc: str = "", **kwargs):
        return original(net, dying(loader) if desc == f"epoch {epoch}" else loader, *args, desc=desc, **kwargs)

    training.train_one_epoch = train_one_epoch


def finished(run: Path) -> bool:
    return (run / "fit.json").is_file() and json.loads((run / "fit.json").read_text())["finished"]


def main(root: Path, base: Path) -> None:
    from helpers import distributed, workbook
    from helpers.checkpoint import load_checkpoint
    from helpers.train import main as train_main
    from helpers.training import fit

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    record_writes(base, int(os.environ["RANK"]), attempt)
    ctx = distributed.context()
    train, val = datasets(root)
    killed = base / "killed"
    resume = workbook.interrupted_training(killed)
    emit("STARTED " + json.dumps({"rank": ctx.rank, "attempt": attempt,
                                  "resumes_after": load_checkpoint(killed / "last.pt")["epoch"] if resume else 0}))
    ctx.barrier()  # every process has looked at BASE/killed before anything is written there
    if not finished(base / "ddp"):
        fit(model(), train, val, out_dir=base / "ddp", **SETTINGS)
    if not finished(base / "cli"):
        status = train_main(["--run-name", str(base / "cli"), "--data-root", str(root), "--labels-csv", "labels.csv",
                             "--group-col", "type", "--backbone", "efficientnet_lite0", "--strategy", "last_n",
                             "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                             "--device", "cpu",
                             "--num-workers", "0", "--no-progress"])
        assert status == 0, f"helpers.train returned {status}"
    if attempt == 0 and ctx.rank == 1:
        kill_in_epoch(KILL_EPOCH, KILL_STEP)
    fit(model(), train, val, out_dir=killed, resume=resume, **SETTINGS)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
