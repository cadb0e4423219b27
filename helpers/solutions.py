"""Reference solutions to the notebooks' exercises, and the check each exercise cell calls.

An exercise cell defines a function with your code; the check cell after it calls
``solutions.check(name, your_function, *arguments, expected=...)``:

- your function returns an answer: it is checked against ``expected`` and a wrong one fails with
  a hint;
- your function still raises ``NotImplementedError`` (the stub, not attempted): the reference
  solution runs instead, so the notebook (and CI, which runs every notebook) proves the exercise
  is solvable, and the cells after it use the reference's answer;
- your function returns None (a forgotten ``return``): that is an error, not "not attempted".

``solutions.show(name)`` prints a reference solution when you want to compare or are stuck.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2


def majority_baseline(table: pd.DataFrame, classes: list[str]) -> tuple[float, float]:
    """01: the accuracy and the macro-F1 (over ``classes``) of always answering the most frequent label of
    ``table``."""
    counts = table["label"].value_counts()
    share = counts.iloc[0] / counts.sum()  # the accuracy; also the majority class's precision, and its recall is 1
    majority_f1 = 2 * share * 1.0 / (share + 1.0)  # the harmonic mean of precision and recall
    return share, majority_f1 / len(classes)  # every other class is never predicted: F1 = 0


def with_rotation(transform: v2.Compose, degrees: float) -> v2.Compose:
    """02: ``transform`` with a random rotation of up to ``degrees`` before the final scaling steps."""
    steps = list(transform.transforms)
    return v2.Compose([*steps[:-2], v2.RandomRotation(degrees), *steps[-2:]])


def train_last_two_stages_and_head(model: nn.Module) -> int:
    """03: freeze everything, then train the last two stages, the head and the classifier;
    return the number of trainable parameters."""
    model.requires_grad_(False)
    for name in model.group_names[-4:]:  # stageN-1, stageN, head, classifier
        model.groups[name].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_one_epoch_clipped(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                            criterion: nn.Module, device: torch.device, max_norm: float) -> float:
    """04: the hand-written epoch with gradient clipping; returns the mean training loss."""
    model.train()
    total, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # rescale so the norm is at most max_norm
        optimizer.step()
        total, seen = total + loss.item() * len(y), seen + len(y)
    return total / seen


def threshold_for_recall(scores: np.ndarray, is_positive: np.ndarray, recall: float) -> float:
    """05: the highest threshold on ``scores`` whose recall of the positive class is at least ``recall``."""
    from sklearn.metrics import precision_recall_curve

    if not np.any(is_positive):  # recall is undefined: scikit-learn would only warn and return nonsense
        raise ValueError("no positive example among the scores: a threshold for a recall needs at least one")
    _, recalls, thresholds = precision_recall_curve(is_positive, scores)
    reaching = recalls[:-1] >= recall  # recalls[i] belongs to thresholds[i]; the last point has none
    return float(thresholds[reaching].max())


SOLUTIONS: dict[str, Callable] = {
    "majority_baseline": majority_baseline,
    "with_rotation": with_rotation,
    "train_last_two_stages_and_head": train_last_two_stages_and_head,
    "train_one_epoch_clipped": train_one_epoch_clipped,
    "threshold_for_recall": threshold_for_recall,
}


def _solution(name: str) -> Callable:
    if name not in SOLUTIONS:
        raise KeyError(f"no exercise {name!r}; the exercises are {sorted(SOLUTIONS)}")
    return SOLUTIONS[name]


def show(name: str) -> None:
    """Print the reference solution of exercise ``name``."""
    print(inspect.getsource(_solution(name)))


def _same(answer: object, expected: object, tolerance: float) -> bool:
    if isinstance(expected, (int, float, np.number)):
        return math.isclose(float(answer), float(expected), rel_tol=tolerance, abs_tol=tolerance)
    if isinstance(expected, torch.Tensor):
        return isinstance(answer, torch.Tensor) and answer.shape == expected.shape and bool(
            torch.allclose(answer, expected, atol=tolerance, rtol=tolerance))
    return answer == expected


def _short(answer: object, limit: int = 200) -> str:
    """``repr(answer)`` on one line, cut to ``limit`` characters (a Compose prints a dozen lines)."""
    text = " ".join(repr(answer).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def check(name: str, attempt: Callable, *args, expected: object = None, tolerance: float = 1e-6,
          verify: Callable[[object], bool] | None = None, hint: str = "") -> object:
    """Run your ``attempt(*args)``; check its answer (equal to ``expected``, or ``verify(answer)``).

    Returns the answer. While ``attempt`` is the stub (it raises ``NotImplementedError``), the reference
    solution answers instead (and is checked the same way), with a note saying so.
    """
    try:
        answer, source = attempt(*args), "your answer"
    except NotImplementedError:
        answer, source = _solution(name)(*args), "the reference solution (yours is not written yet)"
    if answer is None:
        raise AssertionError(f"exercise {name}: your function returned None: does it end with `return ...`? "
                             f"(While it still raises NotImplementedError, the reference solution runs instead.) "
                             f"{hint}")
    try:
        ok = verify(answer) if verify is not None else _same(answer, expected, tolerance)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as err:
        # A number was expected and a label came back, or a list where a Compose was: say so, with the hint.
        wanted = f"something like {expected!r}" if expected is not None else "another kind of value"
        raise AssertionError(f"exercise {name}: {source} is a {type(answer).__name__} ({_short(answer)}), where "
                             f"the check needs {wanted}: {type(err).__name__}: {err}. {hint} "
                             f"(solutions.show({name!r}) prints a solution)") from err
    if not ok:
        shown = f"expected {expected!r}, got {_short(answer)}" if verify is None else f"got {_short(answer)}"
        raise AssertionError(f"exercise {name}: {source} is not right: {shown}. {hint} "
                             f"(solutions.show({name!r}) prints a solution)")
    if source == "your answer":
        print(f"exercise {name}: your answer checks out.")
    else:
        print(f"exercise {name}: not attempted yet (your function still raises NotImplementedError), so the "
              f"reference solution ran in its place: its answer, not yours, was checked (and is what any later "
              f"cell uses). Delete the `raise` line and write yours.")
    return answer
