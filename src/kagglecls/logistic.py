"""The head on precomputed activations as a multinomial logistic regression on standardised features, fitted
full-batch with LBFGS, L2 chosen by stratified k-fold cross-validation. Imports nothing of ours."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

log = logging.getLogger(__name__)

BATCHNORM_EPS = 1e-5  # nn.BatchNorm1d's default: the head's BatchNorm computes exactly this standardisation
# L2 penalties tried, strongest first (per row: the loss is mean cross-entropy + l2/2 x |W|^2; scikit-learn's
# C is 1 / (l2 x rows)). The search stops once the cross-validated loss has risen twice in a row.
L2_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)


@dataclass(frozen=True)
class Standardisation:
    mean: torch.Tensor
    var: torch.Tensor  # biased variance, as BatchNorm's running_var holds it for this purpose

    @classmethod
    def of(cls, features: torch.Tensor) -> Standardisation:
        return cls(mean=features.mean(dim=0), var=features.var(dim=0, unbiased=False))

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / torch.sqrt(self.var + BATCHNORM_EPS)


@dataclass(frozen=True)
class LogisticFit:
    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor  # (classes,)
    l2: float
    cv_log_loss: float | None  # mean held-out log loss at the chosen l2; None when l2 was given


def fit_logistic(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_classes: int,
    l2: float,
    max_iter: int = 200,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias minimising mean cross-entropy + l2/2 x |weight|^2 (the bias is not penalised)."""
    weight = torch.zeros(n_classes, features.shape[1], device=features.device)
    bias = torch.zeros(n_classes, device=features.device)
    if start is not None:
        weight, bias = start[0].clone(), start[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            functional.cross_entropy(features @ weight.T + bias, targets) + 0.5 * l2 * weight.square().sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def stratified_folds(targets: np.ndarray, *, n_folds: int, seed: int) -> np.ndarray:
    """A fold index per row: each class's rows, shuffled, dealt round the folds in turn."""
    folds = np.empty(len(targets), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        # Each class starts where the last left off, so small classes do not all fill fold 0 first.
        folds[members] = (offset + np.arange(len(members))) % n_folds
        offset += len(members)
    return folds


def cross_validated_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    folds: np.ndarray,
    *,
    n_classes: int,
    l2: float,
    starts: list | None = None,
) -> tuple[float, list]:
    """Mean held-out log loss over the folds, and each fold's fit (warm starts for the next, weaker l2)."""
    total, fits = 0.0, []
    for fold in range(int(folds.max()) + 1):
        held_out = torch.from_numpy(folds == fold).to(features.device)
        fitted = fit_logistic(
            features[~held_out],
            targets[~held_out],
            n_classes=n_classes,
            l2=l2,
            start=starts[fold] if starts else None,
        )
        logits = features[held_out] @ fitted[0].T + fitted[1]
        total += functional.cross_entropy(logits, targets[held_out], reduction="sum").item()
        fits.append(fitted)
    return total / len(targets), fits


def choose_and_fit(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_classes: int,
    l2: float | None,
    n_folds: int,
    seed: int,
    grid: Sequence[float] = L2_GRID,
) -> LogisticFit:
    """Fit on all rows at `l2`, or at the grid's l2 with the lowest k-fold cross-validated log loss."""
    if l2 is not None:
        weight, bias = fit_logistic(features, targets, n_classes=n_classes, l2=l2)
        return LogisticFit(weight=weight, bias=bias, l2=l2, cv_log_loss=None)
    # Folds need at least two rows a class to leave one out; fewer folds where a class is that small.
    smallest_class = int(np.bincount(targets.cpu().numpy()).min())
    folds = stratified_folds(targets.cpu().numpy(), n_folds=max(2, min(n_folds, smallest_class)), seed=seed)
    best_l2, best_loss, rises, starts = grid[0], math.inf, 0, None
    previous = math.inf
    for candidate in grid:
        loss, starts = cross_validated_loss(
            features, targets, folds, n_classes=n_classes, l2=candidate, starts=starts
        )
        log.info("logistic head: l2 %g, %d-fold cv log loss %.4f", candidate, folds.max() + 1, loss)
        if loss < best_loss:
            best_l2, best_loss = candidate, loss
        rises = rises + 1 if loss > previous else 0
        previous = loss
        if rises == 2:
            break
    weight, bias = fit_logistic(features, targets, n_classes=n_classes, l2=best_l2)
    return LogisticFit(weight=weight, bias=bias, l2=best_l2, cv_log_loss=best_loss)
