"""Test-time augmentation and interpretation: confusion matrix, most confused pairs, top losses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def combine_tta(plain: np.ndarray, augmented: Sequence[np.ndarray], *, beta: float) -> np.ndarray:
    """fastai 2's tta: (1 - beta) x mean of the augmented passes + beta x the plain pass.

    With no augmented pass the plain probabilities are returned unchanged.
    """
    if not augmented:
        return plain
    return (1 - beta) * np.mean(np.stack(augmented), axis=0) + beta * plain


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): T > 1 softens over-confident probabilities, T < 1 sharpens; the argmax is kept."""
    logits = np.log(np.clip(probabilities, 1e-15, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the one T in [0.1, 10] minimising the log loss of
    apply_temperature(probabilities, T) against `targets`."""
    from scipy.optimize import minimize_scalar

    def loss(log_temperature: float) -> float:
        calibrated = apply_temperature(probabilities, float(np.exp(log_temperature)))
        return float(-np.mean(np.log(np.clip(calibrated[np.arange(len(targets)), targets], 1e-15, 1.0))))

    found = minimize_scalar(loss, bounds=(np.log(0.1), np.log(10.0)), method="bounded")
    return float(np.exp(found.x))


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, *, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (targets, predictions), 1)
    return counts


@dataclass(frozen=True)
class ConfusedPair:
    actual: str
    predicted: str
    count: int


def most_confused(counts: np.ndarray, classes: Sequence[str], *, min_count: int = 1) -> list[ConfusedPair]:
    """Off-diagonal cells of the confusion matrix, largest first (ties by class order)."""
    pairs = [
        ConfusedPair(classes[actual], classes[predicted], int(counts[actual, predicted]))
        for actual in range(len(classes))
        for predicted in range(len(classes))
        if actual != predicted and counts[actual, predicted] >= min_count
    ]
    return sorted(pairs, key=lambda pair: -pair.count)


@dataclass(frozen=True)
class TopLoss:
    index: int
    loss: float
    actual: int
    predicted: int
    probability_of_predicted: float


def top_losses(
    probabilities: np.ndarray, targets: np.ndarray, *, k: int, eps: float = 1e-15
) -> list[TopLoss]:
    """The k items with the highest log loss, highest first."""
    losses = -np.log(np.clip(probabilities[np.arange(len(targets)), targets], eps, 1.0))
    order = np.argsort(-losses, kind="stable")[:k]
    predicted = probabilities.argmax(axis=1)
    return [
        TopLoss(
            index=int(index),
            loss=float(losses[index]),
            actual=int(targets[index]),
            predicted=int(predicted[index]),
            probability_of_predicted=float(probabilities[index, predicted[index]]),
        )
        for index in order
    ]
