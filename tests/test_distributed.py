"""fit under torchrun, on the CPU: 2 processes (gloo) against one, a SIGKILL mid-epoch and the
resume, only rank 0 writing, and the command line. Process start-up is the expensive part, so one
torchrun launch does all of it (tests/_ddp_worker.py runs in the processes)."""

import json
import os
import platform
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler

from helpers import lessons, train, workbook
from helpers.checkpoint import load_checkpoint
from helpers.distributed import Distributed, GlobalOrderSampler, single_process_order
from helpers.runtime import make_loader
from helpers.training import fit, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import _ddp_worker as worker  # noqa: E402  (the model, data and settings the processes use)

COMPARE = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
LAUNCH_TIMEOUT_S = 300


def torchrun(root: Path, base: Path) -> tuple[int, str, list[tuple[str, dict]]]:
    """Run the worker in 2 processes on the loopback interface only; (exit status, stderr, the
    STARTED / WRITE records the processes printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TL_SMOKE": "0",
           # a fresh store per restart: sharing torchrun's lets restarted processes read the previous
           # attempt's addresses and fail to connect (pytorch/pytorch#135712)
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if platform.system() == "Linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise use the interface the hostname resolves to
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "--local-addr=127.0.0.1", "--max-restarts=1", str(WORKER), str(root), str(base)]
    # A session of its own, so a timeout ends torchrun's worker processes too.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, start_new_session=True)
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"torchrun ran over {LAUNCH_TIMEOUT_S} s:\n{out[-3000:]}\n{err[-6000:]}")
    records = [(line.split(" ", 1)[0], json.loads(line.split(" ", 1)[1])) for line in out.splitlines()
               if line.startswith(("WRITE {", "STARTED {"))]
    return process.returncode, out[-3000:] + "\n" + err[-6000:], records


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """Two processes with batch B (torchrun), then one with batch 2B (here)."""
    base = tmp_path_factory.mktemp("ddp")
    status, log, records = torchrun(tiny_root, base)
    assert status == 0, f"torchrun exited {status}:\n{log}"
    train, val = worker.datasets(tiny_root)
    fit(worker.model(), train, val, out_dir=base / "one",
        **{**worker.SETTINGS, "batch_size": 2 * worker.SETTINGS["batch_size"]})
    return base, records, len(train)


def test_two_processes_with_batch_b_train_as_one_with_batch_2b(runs):
    base, _, n_train = runs
    assert n_train % (2 * worker.SETTINGS["batch_size"]) == 0, "equal batches need a whole number of them"
    two, one = load_checkpoint(base / "ddp" / "last.pt"), load_checkpoint(base / "one" / "last.pt")
    assert two["world_size"] == 2 and "world_size" not in one
    start = worker.model().state_dict()
    moved = [name for name, weight in one["model"].items() if not torch.equal(weight, start[name])]
    assert len(moved) >= 4, moved  # the last stage, the head's convolution and the classifier trained
    for name, weight in one["model"].items():  # the same sums in another order (and threads): float noise
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    history = {name: pd.read_csv(base / name / "history.csv") for name in ("ddp", "one")}
    pd.testing.assert_frame_equal(history["ddp"][COMPARE], history["one"][COMPARE], rtol=1e-5, atol=1e-6)


def test_only_rank_0_writes(runs):
    _, records, _ = runs
    writes = [record for kind, record in records if kind == "WRITE"]
    assert [w for w in writes if w["rank"] != 0] == []
    written = {w["path"] for w in writes if w["event"] == "os.rename"}
    assert {"ddp/last.pt", "ddp/best.pt", "ddp/history.csv", "ddp/fit.json", "cli/dataset.json", "cli/train.csv",
            "cli/probe.pt", "cli/last.pt", "cli/candidate.pt", "cli/fit.json", "cli/final.pt", "cli/final.json",
            "killed/last.pt"} <= written


def test_command_line_trains_each_process_on_its_cached_share(runs):
    base, _, _ = runs
    summary = json.loads((base / "cli" / "fit.json").read_text())
    assert summary["finished"] and summary["processes"] == 2 and summary["cached"]
    assert summary["train_images"] == len(pd.read_csv(base / "cli" / "train.csv"))
    assert summary["config"]["batch_size"] == 8 and summary["config"]["lr"] == pytest.approx(1e-3 * 2 ** 0.5)
    assert len(pd.read_csv(base / "cli" / "history.csv")) == 1
    # The floor judges the model after its last epoch (restore_best=False), written as candidate.pt
    candidate, last = load_checkpoint(base / "cli" / "candidate.pt"), load_checkpoint(base / "cli" / "last.pt")
    assert candidate["meta"]["epochs"] == last["epoch"] == 1 and candidate["score"] == last["score"]
    for name, weight in last["model"].items():
        torch.testing.assert_close(candidate["model"][name], weight, rtol=0, atol=0, msg=name)


def test_killed_mid_epoch_resumes_under_torchrun_to_the_same_weights(runs):
    base, records, _ = runs
    starts = sorted((r["attempt"], r["rank"], r["resumes_after"]) for kind, r in records if kind == "STARTED")
    assert starts == [(0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)], starts  # killed in epoch 2: resumed after 1
    resumed, uninterrupted = load_checkpoint(base / "killed" / "last.pt"), load_checkpoint(base / "ddp" / "last.pt")
    assert resumed["epoch"] == uninterrupted["epoch"] == worker.SETTINGS["epochs"]
    for name, weight in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, rtol=0, atol=0, msg=name)
    assert str(resumed["optimizer"]) == str(uninterrupted["optimizer"])
    pd.testing.assert_frame_equal(pd.read_csv(base / "killed" / "history.csv")[COMPARE],
                                  pd.read_csv(base / "ddp" / "history.csv")[COMPARE])


def test_a_checkpoint_of_two_processes_does_not_resume_in_one(runs, tiny_root):
    base, _, _ = runs
    before = (base / "ddp" / "last.pt").read_bytes()
    train, val = worker.datasets(tiny_root)
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\), this run has 1"):
        fit(worker.model(), train, val, out_dir=base / "ddp", resume=True, **worker.SETTINGS)
    assert (base / "ddp" / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------
# The pieces, in one process


def test_global_order_is_the_order_one_process_trains_on():
    seen = []

    class Recorder(torch.nn.Module):  # notes the items train_one_epoch feeds it
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, 2))

        def forward(self, x):
            seen.extend(x[:, 0].long().tolist())
            return x[:, :1] * self.weight

    items = torch.utils.data.TensorDataset(torch.arange(23.0).view(23, 1), torch.zeros(23, dtype=torch.long))
    loader = make_loader(items, 5, True, torch.device("cpu"), seed=3007, num_workers=0)
    model = Recorder()
    train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                    torch.device("cpu"))
    assert seen == single_process_order(23, 3007) and sorted(seen) == list(range(23))


def test_shares_interleave_into_the_single_process_batches():
    n, batch, world = 24, 3, 2
    order = single_process_order(n, 3000 + 2)
    shares = []
    for rank in range(world):
        sampler = GlobalOrderSampler(list(range(n)), world, rank, seed=3000)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    assert isinstance(sampler, DistributedSampler) and len(shares[0]) == n // world
    for step in range(n // (world * batch)):
        together = sorted(i for share in shares for i in share[step * batch:(step + 1) * batch])
        assert together == sorted(order[step * world * batch:(step + 1) * world * batch])


def test_odd_sizes_pad_the_training_shares_but_not_the_validation_ones():
    ranks = [Distributed(rank, 2) for rank in range(2)]
    train = [list(ctx.shard(list(range(5)), pad=True)) for ctx in ranks]
    val = [list(ctx.shard(list(range(5)), pad=False)) for ctx in ranks]
    assert train == [[0, 2, 4], [1, 3, 0]] and val == [[0, 2, 4], [1, 3]]
    data = list(range(5))
    assert Distributed().shard(data, pad=True) is data
    assert Distributed(1, 2).seed(7) != Distributed(0, 2).seed(7) == Distributed().seed(7) == 7


def test_sync_batchnorm_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="sync_batchnorm=True needs CUDA"):
        Distributed(0, 2).sync_batchnorm(torch.nn.BatchNorm2d(3), torch.device("cpu"))


def test_command_line_split_runs_notebook_02s_mirror_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TL_SMOKE", "1")
    values = {"run_name": str(tmp_path / "r"), "backbone": "efficientnet_lite0"}
    main = SimpleNamespace(is_main=True, barrier=lambda: None)
    with warnings.catch_warnings():  # the recipe is settled, so nothing to warn about
        warnings.simplefilter("error", workbook.UnsettledRecipeWarning)
        params = train.resolve(values, main)
    table = pd.read_csv(params.run / "mirror_check.csv")
    assert list(table["mirror"]) == ["none", *["horizontal mirror"] * 3, *["vertical mirror"] * 3]  # cells' mirrors
    lost = lessons.mirror_conflicts(table, "cells")
    assert params.augment == params.settled_augment == ("cells_no_flip" if lost else "cells")
    assert json.loads((params.run / "dataset.json").read_text())["augment"] == params.augment
    out = capsys.readouterr().out
    assert "making notebook 02's split" in out and f"augment={params.augment!r}" in out
    before = (params.run / "mirror_check.csv").stat().st_mtime_ns
    assert train.resolve(values, main).augment == params.augment  # settled once: not measured again
    assert (params.run / "mirror_check.csv").stat().st_mtime_ns == before


def test_command_line_without_mirror_check_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TL_SMOKE", "1")
    values = {"run_name": str(tmp_path / "r")}
    main = SimpleNamespace(is_main=True, barrier=lambda: None)
    with pytest.warns(workbook.UnsettledRecipeWarning, match="mirror check has not run") as caught:
        params = train.resolve(values, main, check_mirrors=False)
    assert [w.category for w in caught].count(workbook.UnsettledRecipeWarning) == 1
    assert params.augment == params.default_augment and not (params.run / "mirror_check.csv").exists()
    assert "making notebook 02's split" in capsys.readouterr().out
    with warnings.catch_warnings():  # the other processes find the split and stay quiet
        warnings.simplefilter("error", workbook.UnsettledRecipeWarning)
        assert train.resolve(values, SimpleNamespace(is_main=False, barrier=lambda: None)).augment == params.augment