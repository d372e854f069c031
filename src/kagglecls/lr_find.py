"""fastai's learning-rate finder: an exponential lr sweep, then a suggestion read off the smoothed loss curve."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kagglecls.device import StepSettings, uncompiled


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed, debiased


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    start_lr: float,
    end_lr: float,
    num_steps: int,
    settings: StepSettings,
    smoothing: float = 0.98,
    divergence: float = 4.0,
) -> LrFindResult:
    """lr_i = start x (end/start)^(i/n), one batch a step, smoothed debiased loss; stops when the loss exceeds
    `divergence` x the best or is NaN. Model and optimizer state are restored afterwards."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    lrs, losses = [], []
    try:
        lrs, losses = _sweep(
            model, optimizer, loader, start_lr, end_lr, num_steps, settings, smoothing, divergence
        )
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    return LrFindResult(lrs=lrs, losses=losses)


def _sweep(model, optimizer, loader, start_lr, end_lr, num_steps, settings, smoothing, divergence):
    settings.train_mode(model)
    loss_function = nn.CrossEntropyLoss()
    # Under DDP every rank must see the same curve, or ranks stop at different steps (a hang) and suggest
    # different lrs (replicas that drift apart).
    synchronised = isinstance(uncompiled(model), nn.parallel.DistributedDataParallel)
    average, best = 0.0, math.inf
    lrs, losses = [], []
    peak = [group["initial_lr"] for group in optimizer.param_groups]
    top = max(peak)
    step = 0
    while step < num_steps:
        for inputs, targets in loader:
            lr = start_lr * (end_lr / start_lr) ** (step / max(num_steps - 1, 1))
            for group, group_peak in zip(optimizer.param_groups, peak, strict=True):
                group["lr"] = lr * group_peak / top  # keep differential ratios during the sweep
            with settings.autocast():
                loss = loss_function(model(settings.move(inputs)), targets.to(settings.device))
            optimizer.zero_grad(set_to_none=True)
            settings.backward_and_step(loss, optimizer)
            value = _mean_over_ranks(loss) if synchronised else loss.item()
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            step += 1
            if step >= num_steps or not math.isfinite(smoothed) or smoothed > divergence * best:
                return lrs, losses
    return lrs, losses


def _mean_over_ranks(loss: torch.Tensor) -> float:
    total = loss.detach().to(torch.float64, copy=True)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def suggestion_window(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """fastai 2 drops the first 10% and the last 5 points before suggesting (or plotting)."""
    n = len(lrs)
    start, end = n // 10, max(n - 5, n // 10 + 2)
    return np.asarray(lrs[start:end], dtype=np.float64), np.asarray(losses[start:end], dtype=np.float64)


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr at the lowest loss, one order of magnitude back."""
    losses = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=np.inf)
    return float(lrs[int(np.argmin(losses))]) / 10


def suggest_steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest against log(lr)."""
    lrs_array, losses_array = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    slopes = np.diff(losses_array) / np.diff(np.log(lrs_array))
    return float(lrs_array[int(np.nanargmin(slopes))])


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai 2's valley: the longest decreasing run of the loss, about half way along it."""
    n = len(losses)
    run_length = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run_length[i] < run_length[j] + 1:
                run_length[i] = run_length[j] + 1
            if run_length[best_end] < run_length[i]:
                best_end = i
                best_start = best_end - run_length[best_end]
    sections = (best_end - best_start) / 3
    return float(lrs[best_start + int(sections) + int(sections / 2)])


SUGGESTERS = {"valley": suggest_valley, "minimum": suggest_minimum, "steep": suggest_steep}


# A sweep whose smoothed loss never falls this much below its first value has nothing to suggest from: a flat
# curve, or a model already at its minimum (a trained head), whose loss only rises as the lr grows.
MIN_RELATIVE_FALL = 0.01


def suggest_lr(result: LrFindResult, method: str) -> float | None:
    """The suggested lr, or None where the curve cannot give one (too few steps, or a loss that never fell)."""
    lrs, losses = suggestion_window(result.lrs, result.losses)
    if len(lrs) < 3:
        return None
    first, lowest = float(losses[0]), float(np.nanmin(losses))
    if not first - lowest > MIN_RELATIVE_FALL * abs(first):
        return None
    return SUGGESTERS[method](list(lrs), list(losses))


def why_no_suggestion(result: LrFindResult) -> str:
    steps = len(result.lrs)
    if len(suggestion_window(result.lrs, result.losses)[0]) < 3:
        return f"the sweep stopped after {steps} steps, too few to read"
    return f"the loss never fell by {MIN_RELATIVE_FALL:.0%} over {steps} steps"
