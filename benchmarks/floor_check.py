"""What did the floor's tie rule cost, and how often does it let through a model no better than the probe?

Notebook 04 keeps the strategy's model (``candidate.pt``: after phase 2's last epoch) only when it beats the
linear probe (``probe.pt``) on validation by more than two standard errors; otherwise ``final.pt`` is the probe.
Given run folders, this script scores both checkpoints of finished course runs on their test split, so one can
see whether the models the rule set aside would have done better. It is a check of the rule, not a way to
choose: nothing here feeds back into a run.

    python benchmarks/floor_check.py runs/byod-*-seed0 runs/byod-*-seed1

Per run: the validation evidence 04 decided on (from ``final.json``), which model it kept, and the test
accuracy (or the run's selection metric) of both.

    python benchmarks/floor_check.py --selection

simulates the rule: a fine-tuned model exactly as accurate as the probe (then the share of runs in which it
replaces the probe is the rule's false-alarm rate; two standard errors promise about 2.5 %), 2 points worse (a
replacement that costs accuracy), or 3 points better (then that share is the rule's power), judged either at its
last epoch (what notebook 04 does) or at its best validation epoch (``best.pt``), on the same validation images;
with and without early stopping. About two minutes, no data needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from helpers.checkpoint import checkpoint_preprocessing, model_from_checkpoint
from helpers.data import ImageDataset, load_splits
from helpers.evaluation import predict
from helpers.metrics import score
from helpers.transforms import eval_transform


def test_score(run_dir: Path, checkpoint: str, metric: str) -> float:
    """``metric`` of ``run_dir/checkpoint`` on the run's test split, with the checkpoint's own preprocessing."""
    dataset = json.loads((run_dir / "dataset.json").read_text())
    model, ckpt = model_from_checkpoint(run_dir / checkpoint)
    test = ImageDataset(Path(dataset["root"]), load_splits(run_dir)["test"], classes=list(ckpt["classes"]),
                        transform=eval_transform(checkpoint_preprocessing(ckpt)))
    pred = predict(model, test)
    return score(metric, pred["target"].to_numpy(), pred["predicted"].to_numpy())


def _answers(rng: np.random.Generator, chance: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """A binary model's answers: right with each image's chance, else the other class."""
    return np.where(rng.random(len(targets)) < chance, targets, 1 - targets)


def replacement_rates(images: int = 296, accuracy: float = 0.85, epochs: int = 10, carry: float = 0.7,
                      patience: int | None = None, gain: float = 0.0, trials: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """How often the floor replaces the probe with a fine-tuned model whose answers are right ``gain`` more often
    (0: exactly as accurate, so every replacement is a false alarm), judged at its last epoch and at its best
    validation epoch. Each image gets its own chance of being answered right (a Beta draw around ``accuracy``),
    shared by the probe and every epoch, so the models agree on the easy images as real ones do; each epoch keeps
    a share ``carry`` of the previous epoch's answers (epochs drift, they are not redrawn); with ``patience``,
    training stops after that many epochs without a new best, as `fit` does."""
    from helpers.selection import floor_scores

    rng = np.random.default_rng(seed)
    replaced = {"last epoch": 0, "best epoch": 0}
    for _ in range(trials):
        targets = rng.integers(0, 2, images)
        chance = rng.beta(4 * accuracy, 4 * (1 - accuracy), images)  # mean `accuracy`, hard and easy images
        tuned_chance = np.clip(chance + gain, 0.0, 1.0)
        probe, epoch_answers = _answers(rng, chance, targets), [_answers(rng, tuned_chance, targets)]
        best_score, bad_epochs = (epoch_answers[0] == targets).mean(), 0
        while len(epoch_answers) < epochs and (patience is None or bad_epochs < patience):
            epoch_answers.append(np.where(rng.random(images) < carry, epoch_answers[-1],
                                          _answers(rng, tuned_chance, targets)))
            current = (epoch_answers[-1] == targets).mean()
            best_score, bad_epochs = (current, 0) if current > best_score else (best_score, bad_epochs + 1)
        best = max(epoch_answers, key=lambda a: (a == targets).mean())  # what best.pt would hold
        for name, candidate in (("last epoch", epoch_answers[-1]), ("best epoch", best)):
            scores = floor_scores("accuracy", targets, probe, candidate)
            replaced[name] += scores["fine_tuned"] - scores["probe"] > scores["noise"]
    return {name: count / trials for name, count in replaced.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", metavar="RUN_DIR")
    parser.add_argument("--selection", action="store_true",
                        help="simulate the rule's false alarms and power (no runs needed)")
    args = parser.parse_args(argv)
    if not args.runs and not args.selection:
        parser.error("give run folders (RUN_DIR ...), or --selection for the simulation")
    if args.selection:
        print("| validation images | epochs | carried over | early stopping | fine-tuned better by | replaced, judged "
              "at the last epoch | replaced, judged at the best epoch |")
        print("|---|---|---|---|---|---|---|")
        for images in (100, 296, 1000):
            for epochs, carry, patience in ((10, 0.7, None), (10, 0.9, None), (15, 0.7, 4)):
                for gain in (-0.02, 0.0, 0.03):
                    rates = replacement_rates(images, epochs=epochs, carry=carry, patience=patience, gain=gain)
                    print(f"| {images} | {epochs} | {carry} | {patience or 'no'} | {gain:+.2f} | "
                          f"{rates['last epoch']:.1%} | {rates['best epoch']:.1%} |", flush=True)
    if not args.runs:
        return
    print("| run | strategy | metric | val probe | val strategy | noise | kept | test probe | test strategy |")
    print("|---|---|---|---|---|---|---|---|---|")
    differences = []
    for run_dir in args.runs:
        final = json.loads((run_dir / "final.json").read_text())
        strategy = json.loads((run_dir / "strategy.json").read_text())["strategy"]
        if final["val_fine_tuned"] is None:  # the strategy was head: the probe is all there is
            print(f"| {run_dir.name} | {strategy} | {final['metric']} | {final['val_probe']:.3f} | – | – | probe "
                  f"| – | – |")
            continue
        # Runs made before candidate.pt existed judged best.pt
        judged = "candidate.pt" if (run_dir / "candidate.pt").is_file() else "best.pt"
        probe, tuned = (test_score(run_dir, name, final["metric"]) for name in ("probe.pt", judged))
        differences.append(tuned - probe)
        print(f"| {run_dir.name} | {strategy} | {final['metric']} | {final['val_probe']:.3f} | "
              f"{final['val_fine_tuned']:.3f} | ±{final['noise']:.3f} | {final['model']} | {probe:.3f} | {tuned:.3f} |",
              flush=True)
    if differences:
        print(f"strategy minus probe on test: mean {np.mean(differences):+.4f}, "
              f"{sum(d > 0 for d in differences)} higher / {sum(d < 0 for d in differences)} lower "
              f"of {len(differences)} run(s)")


if __name__ == "__main__":
    main()
