"""Notebook 04's training from the command line, in one process or many (torchrun).

    python -m helpers.train --run-name big --backbone efficientnet_lite0 --strategy last_n
    torchrun --nproc_per_node=4 -m helpers.train --run-name big --epochs 20        # 4 GPUs
    TL_SMOKE=1 torchrun --nproc_per_node=2 -m helpers.train --run-name ddp-smoke \\
        --backbone efficientnet_lite0 --strategy last_n --device cpu                # 2 CPU processes, tiny data

Takes the notebooks' parameters (``--run-name``, ``--data-root``, ``--labels-csv``, ``--backbone``,
``--strategy``, ``--image-size``, ``--epochs``, ``--batch-size``, ``--lr``, ``--seed`` ...; see
`helpers.workbook.PARAMETERS`), fills the unset ones as notebook 04 does, and trains as it does:
phase 1 (the linear probe, ``probe.pt``), phase 2 (`fit`: ``best.pt``, ``last.pt``, ``history.csv``,
``fit.json``; only for a strategy that trains more than a classifier; then ``candidate.pt``, the model after
its last epoch), and the floor (``final.pt``, ``final.json``: the candidate only if it beats the probe on
validation by more than the noise)
in ``runs/<run-name>/``; notebook 05 evaluates ``final.pt``. Without ``--backbone`` / ``--strategy`` it
reads notebook 01's / 03's choice from the run folder (so on a new run name, give both);
without notebook 02's split there, it makes the same split first, and where 02 did not settle the
augmentation recipe it runs 02's mirror check (``mirror_check.csv``; ``--no-mirror-check`` skips it).
An interrupted run continues from ``last.pt``, also when torchrun restarts it (``--max-restarts``).

Under torchrun, ``--batch-size`` is per process: W processes train with an effective batch of
W x batch size, and the learning rate is scaled for it (``--lr-scaling``: square root by
default, the rule for Adam-type optimizers; ``linear`` is Goyal et al.'s rule for SGD), with
notebook 04's half-epoch linear warm-up. Rank 0 prepares the run folder and writes every file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from typing import Sequence

import torch.distributed as dist

from . import distributed, workbook
from .checkpoint import save_model
from .errors import InputError
from .course import data_root_from_here, parse_value
from .lessons import score_of
from .selection import build_model, phase_one, start_from_probe, trains_beyond_classifier

LR_SCALING = {"sqrt": math.sqrt, "linear": float, "none": lambda processes: 1.0}


def scaled_lr(lr: float, processes: int, rule: str) -> float:
    """The learning rate for ``processes`` times the batch: ``lr`` x sqrt(W), x W or x 1."""
    if rule not in LR_SCALING:
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {list(LR_SCALING)}")
    return lr * LR_SCALING[rule](processes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in workbook.PARAMETERS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default, metavar="VALUE",
                            type=lambda text, key=name: parse_value(text, key),
                            help=f"notebook parameter {name} (default: {default})")
    parser.add_argument("--smoke", action="store_true",
                        help="TL_SMOKE=1: the 64-image ELPV subset (or about 64 of your images), 64 px, 2 epochs")
    parser.add_argument("--lr-scaling", choices=list(LR_SCALING), default="sqrt",
                        help="how the learning rate grows with the number of processes (default: sqrt)")
    parser.add_argument("--sync-batchnorm", action="store_true",
                        help="BatchNorm statistics over all processes' batches (GPUs only)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader processes per training process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-mirror-check", action="store_true",
                        help="where notebook 02 did not settle the augmentation recipe, use the default one "
                             "unchecked instead of measuring whether a mirror keeps the label")
    return parser


def resolve(values: dict, ctx: distributed.Distributed, check_mirrors: bool = True) -> workbook.Params:
    """`workbook.resolve_params` with rank 0 first: it creates the run folder, copies ELPV if needed and,
    where notebook 02 has not, makes its split and runs its mirror check (`workbook.check_mirrors`: the
    recipe loses its flips when a mirror changes the label), while the others wait; they then find it all
    in place. Without ``check_mirrors`` an unsettled recipe is the default one, with a warning."""
    if ctx.is_main:
        params = workbook.resolve_params(values, settled=False)  # the recipe to check: the user's or the default
        if not (params.run / "dataset.json").is_file():
            print(f"[train] no split in {params.run}: making notebook 02's split", flush=True)
            workbook.prepare_split(params)
        if check_mirrors and workbook.settled_recipe(params.run) is None:
            backbone = params.backbone or workbook.read_decision(params)["backbone"]
            _, lost, recipe = workbook.check_mirrors(params, backbone)
            print(f"[train] notebook 02's mirror check ({params.run / 'mirror_check.csv'}): "
                  + (f"the {' and '.join(lost)} lost beyond the noise; " if lost else "no mirror lost; ")
                  + f"augment={recipe!r}", flush=True)
            if lost and recipe == params.augment:  # a recipe the user set is kept, as in notebook 02
                warnings.warn(f"augment={recipe!r} uses the {' and '.join(lost)}, which lost validation accuracy "
                              f"beyond the noise (see {params.run / 'mirror_check.csv'})", stacklevel=2)
        params = workbook.resolve_params(values)  # warns once if the recipe is still unsettled
    ctx.barrier()
    if ctx.is_main:
        return params
    with warnings.catch_warnings():  # rank 0 has said it; one line per process would only repeat it
        warnings.simplefilter("ignore", workbook.UnsettledRecipeWarning)
        return workbook.resolve_params(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the exit status (0 done, 2 bad parameters or missing inputs)."""
    args = build_parser().parse_args(argv)
    from .runtime import tune_cpu
    from .training import fit

    tune_cpu()
    if args.smoke:
        os.environ["TL_SMOKE"] = "1"
    values = data_root_from_here({name: getattr(args, name) for name in workbook.PARAMETERS})
    joined = dist.is_available() and dist.is_initialized()  # by a caller: leave the process group open
    ctx = distributed.context()
    try:
        params = resolve(values, ctx, check_mirrors=not args.no_mirror_check)
        model, budget = workbook.fine_tune_model(params)
        sets = workbook.fine_tune_datasets(params, model, budget)
        settings = workbook.fine_tune_settings(params, budget)
        settings["lr"] = scaled_lr(settings["lr"], ctx.world_size, args.lr_scaling)
        if ctx.is_main:
            print(f"[train] {params.run}: {model.spec.name}, strategy {model.strategy}, {ctx.world_size} process(es) "
                  f"x batch {settings['batch_size']}, lr {settings['lr']:.3g}"
                  + (" (resuming)" if settings["resume"] else "") + f"\n[train] {budget['why']}", flush=True)
        started = time.perf_counter()
        baseline, _ = baseline_probe(params, model.spec.name, sets, budget, ctx)
        candidate, epochs = None, 0
        if model.strategy["name"] != "head":
            start_from_probe(model, baseline, sets["train_plain"], params.device, params.seed, budget["metric"])
            if trains_beyond_classifier(model):
                history = fit(model, sets["train"], sets["val"], sync_batchnorm=args.sync_batchnorm,
                              num_workers=args.num_workers, progress=not args.no_progress, **settings)
                epochs = len(history)
                if ctx.is_main:  # the model after its last epoch (restore_best=False): what the floor judges
                    candidate = workbook.save_candidate(params, model, list(sets["train"].classes), sets["val"],
                                                        budget["metric"], history)
                    print(history.to_string(index=False))
            elif ctx.is_main:  # truncate with only its new classifier: phase 1 was all of it
                candidate = workbook.save_candidate(params, model, list(sets["train"].classes), sets["val"],
                                                    budget["metric"],
                                                    score=score_of(model, sets["val"], params.device, budget["metric"]))
    except InputError as err:  # MissingFileError too; anything else is a bug: it keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if not joined:
            ctx.close()
    if ctx.is_main:
        scores = workbook.validation_scores(params, sets["val"], budget["metric"], fine_tuned=candidate is not None,
                                            device=params.device)
        final = workbook.choose_final(params, scores, budget["metric"], time.perf_counter() - started, epochs,
                                      strategy=model.strategy["name"])
        print(f"[train] {final['explanation']} Checkpoints in {params.run}")
    return 0


def baseline_probe(params: workbook.Params, backbone: str, sets: dict, budget: dict,
                   ctx: distributed.Distributed) -> tuple:
    """The linear probe on ``backbone`` (notebook 04's phase 1 and the course's baseline): rank 0 fits it
    and writes ``probe.pt``, every process loads that file. Returns (the probe model, its validation
    score on rank 0, else None)."""
    from .checkpoint import load_checkpoint

    baseline = build_model(backbone, len(sets["train"].classes), "head")
    path, score = params.run / "probe.pt", None
    if ctx.is_main:
        phase_one(baseline, sets["train_plain"], params.device, params.seed, budget["metric"])
        score = score_of(baseline, sets["val"], params.device, budget["metric"])
        save_model(baseline, list(sets["train"].classes), sets["val"].transform.preprocessing, path,
                   meta={"task": params.task, "phase": 1}, score=score, metric=budget["metric"])
    ctx.barrier()
    baseline.load_state_dict(load_checkpoint(path)["model"])
    return baseline, score


if __name__ == "__main__":
    sys.exit(main())
